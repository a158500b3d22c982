package snapshot

import (
	"bytes"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// fw2OriginCalls records the writes and discards reaching a device.
type fw2OriginCalls struct {
	mu    sync.Mutex // guards calls
	calls []blockdevtest.Call
}

func (r *fw2OriginCalls) record(c blockdevtest.Call) error {
	if c.Op == blockdevtest.OpWrite || c.Op == blockdevtest.OpDiscard {
		r.mu.Lock()
		r.calls = append(r.calls, blockdevtest.Call{Op: c.Op, Off: c.Off, Len: c.Len})
		r.mu.Unlock()
	}
	return nil
}

func (r *fw2OriginCalls) take() []blockdevtest.Call {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

// TestFw2DrainCoalesces: a drain writes each stretch of adjacent buffered
// chunks that were written whole with one origin write (in chunk order,
// at most obRunBytes each), and a chunk written in part or discarded with
// its own write-out, which touches only the blocks written. What reaches
// the origin device is what was written, and the snapshot keeps the old
// data.
func TestFw2DrainCoalesces(t *testing.T) {
	const cs = 4 << 10
	const size = 1 << 20
	mem, err := blockdev.NewMem(size, 512)
	require.NoError(t, err)
	fillPattern(t, mem, 3)
	before := blockdevtest.ReadAll(t, mem)
	store, err := blockdev.NewMem(8<<20, 512)
	require.NoError(t, err)
	fo := blockdevtest.NewFaulty(mem)
	var rec fw2OriginCalls
	fo.FailWhen(rec.record)
	s, err := Format(fo, store, Options{ChunkSize: cs, CommitInterval: -1})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	snap, err := s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	rec.take()

	model := bytes.Clone(before)
	write := func(b byte, off, n int64) {
		fillAt(t, o, b, off, n)
		copy(model[off:off+n], bytes.Repeat([]byte{b}, int(n)))
	}
	// Out of order, and each chunk its own copy-on-write: the drain sorts.
	write(1, 5*cs, cs)
	write(2, 3*cs, cs)
	write(3, 4*cs, cs)
	write(4, 12*cs, cs)
	write(5, 10*cs, cs)
	write(6, 20*cs, cs)
	write(7, 21*cs, 512) // in part: its own write, of that block only
	require.NoError(t, o.Discard(30*cs, cs))
	clear(model[30*cs : 31*cs])
	write(8, 31*cs, cs)
	for c := int64(100); c < 200; c++ { // longer than obRunBytes
		write(byte(c), c*cs, cs)
	}
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, mem), before), "nothing written out before the drain")
	require.NoError(t, o.Flush())
	require.Zero(t, s.Stats().bufferedChunks())

	w := func(off, n int64) blockdevtest.Call {
		return blockdevtest.Call{Op: blockdevtest.OpWrite, Off: off, Len: n}
	}
	const run = obRunBytes / cs
	require.Equal(t, []blockdevtest.Call{
		w(3*cs, 3*cs),
		w(10*cs, cs),
		w(12*cs, cs),
		w(20*cs, cs),
		w(21*cs, 512),
		{Op: blockdevtest.OpDiscard, Off: 30 * cs, Len: cs},
		w(31*cs, cs),
		w(100*cs, run*cs),
		w((100+run)*cs, (100-run)*cs),
	}, rec.take())
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, mem), model), "origin device after the drain")
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, snap), before), "snapshot")
	mustCheck(t, s)
}

// TestFw2DrainPowerCut cuts the power before each device call of a drain
// (its fingerprint mark and journal commit run side by side, then the
// coalesced write-outs, then the origin flush and the settle), with every
// crash policy. After each cut, Open accepts its own origin (no sample
// reached the origin before its dirty mark was durable), the snapshot
// holds the old data (no chunk reached the origin before its copy and
// record were durable), and Check passes.
func TestFw2DrainPowerCut(t *testing.T) {
	seed := blockdevtest.Seed(t)
	const cs = 4 << 10
	const size = 256 << 10
	opts := Options{ChunkSize: cs, CommitInterval: -1}
	pos, n := samplePositions(size)
	for _, pol := range blockdevtest.AllPolicies(seed) {
		for k := 1; ; k++ {
			pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, pol)
			oSim := blockdevtest.MustCrashSim(size, 512)
			fillPattern(t, oSim, 4)
			require.NoError(t, oSim.Flush())
			before := blockdevtest.ReadAll(t, oSim)
			s, err := Format(pc.Device("origin", oSim), pc.NewDevice(t, "store", 4<<20, 512), opts)
			require.NoError(t, err)
			o := s.Origin()
			_, err = s.CreateSnapshot("snap", o)
			require.NoError(t, err)
			require.NoError(t, o.Flush())
			// Every sample's chunk and the one after it: adjacent whole
			// chunks, each a copy-on-write left in the buffer.
			for i := range n {
				for c := pos[i] / cs; c <= min(pos[i]/cs+1, size/cs-1); c++ {
					fillAt(t, o, byte(i+1), c*cs, cs)
				}
			}
			pc.Arm(blockdevtest.OpAny, k)
			ferr := o.Flush()
			fired := pc.Fired()
			out := pc.Cut()
			_ = s.Close()
			if !fired {
				require.NoError(t, ferr)
				t.Logf("%v: %d cut points", pol, k-1)
				break
			}
			require.ErrorIs(t, ferr, blockdevtest.ErrCrashed, "%v", pc)
			s, err = Open(out[0], out[1], opts)
			require.NoError(t, err, "open after %v", pc)
			snap := mustOpen(t, s, "snap")
			require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, snap), before), "snapshot after %v", pc)
			mustCheck(t, s)
			require.NoError(t, s.Close())
		}
	}
}
