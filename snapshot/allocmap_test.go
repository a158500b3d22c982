package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/nbd"
)

const amChunk = 64 << 10

// sparseGolden formats a store over a Mem origin that holds data only in
// chunks 0-3 and 10 (the rest never written: holes).
func sparseGolden(t *testing.T, storeSize int64) (*Store, *blockdev.Mem) {
	t.Helper()
	origin, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(storeSize, 4096)
	require.NoError(t, err)
	for _, c := range []int64{0, 1, 2, 3, 10} {
		_, err := origin.WriteAt(bytes.Repeat([]byte{byte(c + 1)}, amChunk), c*amChunk)
		require.NoError(t, err)
	}
	s, err := Format(origin, store, Options{ChunkSize: amChunk, CommitInterval: -1})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, origin
}

// allocMap walks d's MapAllocation over the whole device, checking the
// contract (positive, block multiples, within the request) and that
// every range reported as a hole or zero reads as zeros. It returns the
// state of each chunk (the state of its first block).
func allocMap(t *testing.T, d blockdev.Device) []blockdev.Allocation {
	t.Helper()
	am, ok := d.(blockdev.AllocationMapper)
	require.True(t, ok)
	img := blockdevtest.ReadAll(t, d)
	var out []blockdev.Allocation
	for off := int64(0); off < d.Size(); {
		l, st, err := am.MapAllocation(off, d.Size()-off)
		require.NoError(t, err)
		require.Positive(t, l)
		require.LessOrEqual(t, off+l, d.Size())
		require.Zero(t, l%int64(d.BlockSize()))
		if st != blockdev.Allocated {
			require.Equal(t, make([]byte, l), img[off:off+l], "range %d+%d reported %v reads data", off, l, st)
		}
		for c := (off + amChunk - 1) / amChunk; c*amChunk < off+l; c++ {
			out = append(out, st)
		}
		off += l
	}
	return out
}

// A fresh clone of a sparse golden image shows the image's holes; its own
// writes are data; zeroed and discarded chunks are holes; snapshots keep
// what they saw.
func TestMapAllocationFromMetadata(t *testing.T) {
	s, _ := sparseGolden(t, 16<<20)
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	A, H := blockdev.Allocated, blockdev.Hole
	want := make([]blockdev.Allocation, 64)
	for i := range want {
		want[i] = H
	}
	for _, i := range []int{0, 1, 2, 3, 10} {
		want[i] = A
	}
	require.Equal(t, want, allocMap(t, g))
	require.Equal(t, want, allocMap(t, c))
	require.Equal(t, want, allocMap(t, s.Origin()))

	fillAt(t, c, 9, 20*amChunk, amChunk) // a write to a hole
	require.NoError(t, c.WriteZeroes(0, 2*amChunk))
	require.NoError(t, c.Discard(10*amChunk, amChunk))
	cs, err := s.CreateSnapshot("cs", c)
	require.NoError(t, err)
	require.NoError(t, c.WriteZeroes(20*amChunk, amChunk)) // cs still needs chunk 20
	want2 := slicesClone(want)
	want2[0], want2[1], want2[10], want2[20] = H, H, H, A
	require.Equal(t, want2, allocMap(t, cs))
	want2[20] = H
	require.Equal(t, want2, allocMap(t, c))
	require.Equal(t, want, allocMap(t, g))
	require.Equal(t, bytes.Repeat([]byte{9}, amChunk), amRead(t, cs, 20))

	// A part-chunk zeroing writes zeros into the chunk: still data.
	require.NoError(t, c.WriteZeroes(2*amChunk, 4096))
	require.Equal(t, A, allocMap(t, c)[2])
	require.Equal(t, make([]byte, 4096), amRead(t, c, 2)[:4096])

	_, _, err = g.MapAllocation(1, 512)
	require.ErrorIs(t, err, blockdev.ErrMisaligned)
	_, _, err = g.MapAllocation(0, s.Origin().Size()+4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	require.ErrorIs(t, g.WriteZeroes(0, amChunk), ErrReadOnly)
	mustCheck(t, s)
}

// amRead reads chunk c of v.
func amRead(t *testing.T, v *Volume, c int64) []byte {
	t.Helper()
	p := make([]byte, amChunk)
	_, err := v.ReadAt(p, c*amChunk)
	require.NoError(t, err)
	return p
}

func slicesClone(a []blockdev.Allocation) []blockdev.Allocation {
	return append([]blockdev.Allocation(nil), a...)
}

// Zeroing whole chunks of a clone allocates no store chunk and releases
// the ones it replaces once no snapshot needs them.
func TestWriteZeroesAllocatesNothing(t *testing.T) {
	s, _ := sparseGolden(t, 16<<20)
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	used := func() uint64 {
		require.NoError(t, s.Checkpoint(context.Background())) // frees become reusable
		return s.Stats().usedChunks()
	}
	u0 := used()
	require.NoError(t, c.WriteZeroes(0, 16*amChunk)) // over golden data and holes
	require.Equal(t, u0, used())
	fillAt(t, c, 5, 30*amChunk, 16*amChunk)
	require.Equal(t, u0+16, used())
	require.NoError(t, c.WriteZeroes(30*amChunk, 16*amChunk))
	require.Equal(t, u0, used())
	require.Equal(t, make([]byte, 32*amChunk), blockdevtest.ReadAll(t, c)[30*amChunk:62*amChunk])
	mustCheck(t, s)
}

// The origin volume: WriteZeroes writes zeros through the copy-on-write
// path (a snapshot keeps the old data), and a chunk whose new data waits
// in the origin buffer is reported allocated.
func TestOriginWriteZeroesAndMap(t *testing.T) {
	origin, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(16<<20, 4096)
	require.NoError(t, err)
	_, err = origin.WriteAt(bytes.Repeat([]byte{7}, amChunk), 0)
	require.NoError(t, err)
	s, err := Format(origin, store, Options{ChunkSize: amChunk, CommitInterval: -1, OriginBuffer: 8 << 20})
	require.NoError(t, err)
	defer s.Close()
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	fillAt(t, o, 3, 5*amChunk, amChunk) // a hole of the origin device, copied for s1 and buffered
	require.Equal(t, blockdev.Allocated, allocMap(t, o)[5])
	require.Equal(t, blockdev.Allocated, allocMap(t, s1)[5]) // s1's copy of the hole is a store chunk
	require.Equal(t, blockdev.Hole, allocMap(t, s1)[6])
	require.NoError(t, o.WriteZeroes(0, amChunk))
	require.Equal(t, make([]byte, amChunk), amRead(t, o, 0))
	require.Equal(t, bytes.Repeat([]byte{7}, amChunk), amRead(t, s1, 0))
	require.NoError(t, o.Flush())
	require.Equal(t, blockdev.Allocated, allocMap(t, o)[5])
	mustCheck(t, s)
}

// Random writes, zeroings, discards and snapshots on a clone: every
// volume's map keeps the contract and its holes read as zeros, and the
// clone reads as the model says.
func TestMapAllocationRandom(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 3))
	s, _ := sparseGolden(t, 64<<20)
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	model := blockdevtest.ReadAll(t, c)
	vols := []*Volume{g, c}
	for i := 0; i < 200; i++ {
		off := rng.Int64N(int64(len(model))/4096) * 4096
		n := min(int64(len(model))-off, (1+rng.Int64N(40))*4096)
		switch rng.IntN(10) {
		case 0, 1, 2, 3:
			p := bytes.Repeat([]byte{byte(1 + rng.IntN(255))}, int(n))
			_, err = c.WriteAt(p, off)
			copy(model[off:], p)
		case 4, 5, 6:
			err = c.WriteZeroes(off, n)
			clear(model[off : off+n])
		case 7, 8:
			err = c.Discard(off, n)
			clear(model[off : off+n])
		default:
			var sn *Volume
			sn, err = s.CreateSnapshot(fmt.Sprintf("s%d", i), c)
			vols = append(vols, sn)
		}
		require.NoError(t, err, "step %d", i)
	}
	require.Equal(t, model, blockdevtest.ReadAll(t, c))
	for _, v := range vols {
		allocMap(t, v)
	}
	mustCheck(t, s)
}

// Over NBD, nbdinfo --map of a fresh clone of a sparse golden image shows
// the image's holes.
func TestNBDMapShowsHoles(t *testing.T) {
	if _, err := exec.LookPath("nbdinfo"); err != nil {
		t.Skip("nbdinfo (libnbd-bin) is not installed")
	}
	s, _ := sparseGolden(t, 16<<20)
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "c", Device: c})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	defer func() {
		require.NoError(t, srv.Close())
		<-done
	}()
	out, err := exec.Command("nbdinfo", "--map", "nbd://"+l.Addr().String()+"/c").CombinedOutput()
	require.NoError(t, err, "%s", out)
	// nbdinfo prints: offset length type description.
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 3, "%q", line)
		got = append(got, f[0]+" "+f[1]+" "+f[2])
	}
	require.Equal(t, []string{
		"0 262144 0", "262144 393216 3", "655360 65536 0", "720896 3473408 3",
	}, got)
}
