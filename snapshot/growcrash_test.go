package snapshot

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// growCrashWrites is how many chunks past the old end the crash test
// writes (and flushes) right after a Grow.
const growCrashWrites = 8

// A Grow, and writes allocating past the old end right after it, cut short
// by a power cut at each of their store device calls in turn, under every
// crash policy (Tear included: an unflushed write's sectors may be
// garbage). The store reopens with block 0 as Format wrote it and the data
// region as it was or grown (grown whenever Grow returned), Check passes,
// every acknowledged (flushed) write reads back, and a Grow then gives the
// rest of the device, which takes writes.
func TestGrowPowerCut(t *testing.T) {
	seed := blockdevtest.Seed(t)
	opts := Options{ChunkSize: growChunk, CommitInterval: -1, MetadataBytes: 1 << 20}
	origin, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	base, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	s, err := Format(origin, base, opts)
	require.NoError(t, err)
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	next := fillUntilFull(t, c, 0)
	before := s.Stats().dataChunks()
	require.NoError(t, s.Close())
	img := blockdev.AlignedBuffer(int(base.Size()))
	_, err = base.ReadAt(img, 0)
	require.NoError(t, err)
	const bigSize = 12 << 20
	grownChunks := before + (bigSize-8<<20)/growChunk

	for _, pol := range blockdevtest.AllPolicies(seed) {
		grownAt := 0
		for k := 1; ; k++ {
			sim := blockdevtest.MustCrashSim(bigSize, 4096)
			_, err := sim.WriteAt(img, 0)
			require.NoError(t, err)
			require.NoError(t, sim.Flush())
			tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, pol)
			s, err := Open(origin, tr.Device("store", sim), opts)
			require.NoError(t, err)
			tr.Arm(blockdevtest.OpAny, k)
			_, gerr := s.Grow()
			acked := int64(0)
			if gerr == nil {
				acked = writePastEnd(s, next)
			}
			fired := tr.Fired()
			out := tr.Cut()
			_ = s.Close()
			if !fired {
				require.NoError(t, gerr)
				require.Equal(t, int64(growCrashWrites), acked)
				t.Logf("%v: %d cut points, %d of them after the grow was durable", pol, k-1, grownAt)
				break
			}
			if gerr != nil && !errors.Is(gerr, blockdevtest.ErrCrashed) {
				require.NoError(t, gerr, "cut %v", tr)
			}
			require.Equal(t, img[:superblockSize], block0(t, out[0]), "block 0 changed (%v)", tr)

			s, err = Open(origin, out[0], opts)
			require.NoError(t, err, "open after %v", tr)
			got := s.Stats().dataChunks()
			if gerr == nil {
				require.Equal(t, grownChunks, got, "an acknowledged grow was lost (%v)", tr)
				grownAt++
			} else {
				require.Contains(t, []uint64{before, grownChunks}, got, "%v", tr)
			}
			mustCheck(t, s)
			v := mustOpen(t, s, "c")
			for i := int64(0); i < next; i++ {
				require.Equal(t, bytes.Repeat([]byte{byte(i)}, growChunk), amReadAt(t, v, i*growChunk), "chunk %d (%v)", i, tr)
			}
			for j := int64(0); j < acked; j++ {
				require.Equal(t, bytes.Repeat([]byte{pastEndByte(j)}, growChunk), amReadAt(t, v, (next+j)*growChunk),
					"acknowledged write %d past the old end (%v)", j, tr)
			}
			added, err := s.Grow()
			require.NoError(t, err, "grow again after %v", tr)
			require.Equal(t, int64(grownChunks-got)*growChunk, added, "%v", tr)
			// Chunks a surviving unacknowledged write mapped are rewritten
			// in place: the refill ends at the grown region's end.
			end := fillUntilFull(t, v, next+acked)
			require.Equal(t, next+int64(grownChunks-before), end, "%v", tr)
			mustCheck(t, s)
			require.NoError(t, s.Close())
		}
	}
}

func pastEndByte(j int64) byte { return byte(0x80 + j) }

// writePastEnd writes growCrashWrites chunks of clone c from chunk next
// on (past the old end of a full store) and flushes them; it returns how
// many are acknowledged: all of them when the flush succeeded, else none.
func writePastEnd(s *Store, next int64) int64 {
	v, err := s.OpenVolume("c")
	if err != nil {
		return 0
	}
	for j := int64(0); j < growCrashWrites; j++ {
		if _, err := v.WriteAt(bytes.Repeat([]byte{pastEndByte(j)}, growChunk), (next+j)*growChunk); err != nil {
			return 0
		}
	}
	if v.Flush() != nil {
		return 0
	}
	return growCrashWrites
}
