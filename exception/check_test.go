package exception

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// kernelImage is a COW device as the kernel leaves it after out-of-order
// commits and a crash: 4 KiB chunks, chunk 4 allocated but never committed.
func kernelImage(t *testing.T) (*blockdev.Mem, []kpair) {
	const chunk = 4096
	img := make([]byte, 1<<20)
	putKernelHeader(img, 1, 1, chunk/512)
	pairs := []kpair{{5, 3}, {2, 2}, {7, 5}, {100, 6}}
	for i, p := range pairs {
		putKernelPair(img, chunk, 0, i, p)
		copy(img[int(p.new)*chunk:], chunkPattern(p.old, chunk))
	}
	return memFrom(t, img, 512), pairs
}

// A COW device opened through a read-only view (as one the kernel wrote
// and still owns would be) reads, checks and closes without writing a
// byte: Close leaves the recovery record alone when nothing changed.
func TestOpenReadOnlyCOWClosesCleanly(t *testing.T) {
	kernel, _ := kernelImage(t)
	ours := blockdevtest.NewMem(t, 1<<20, 512)
	originDev := blockdevtest.NewMem(t, 1<<20, 512)
	mustWrite(t, originDev, blockdevtest.Fill(0x11, 1<<20), 0)
	o := newOrigin(t, originDev)
	s, err := o.CreateSnapshot(ours, Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)
	mustWrite(t, o, blockdevtest.Fill(0x22, 8192), 4096)
	want := blockdevtest.ReadAll(t, s)
	require.NoError(t, s.Close())
	require.NoError(t, o.Close()) // the devices are locked until then

	for name, cow := range map[string]*blockdev.Mem{"kernel": kernel, "ours": ours} {
		t.Run(name, func(t *testing.T) {
			before := blockdevtest.ReadAll(t, cow)
			o := newOrigin(t, blockdev.ReadOnly(originDev))
			s, err := o.OpenSnapshot(blockdev.ReadOnly(cow), Options{})
			require.NoError(t, err)
			got := blockdevtest.ReadAll(t, s)
			if name == "ours" {
				require.Equal(t, want, got)
			}
			_, err = s.Check()
			require.NoError(t, err)
			require.NoError(t, s.Close())
			require.Equal(t, before, blockdevtest.ReadAll(t, cow))
			rep, err := CheckCOW(blockdev.ReadOnly(cow), originDev.Size())
			require.NoError(t, err)
			require.True(t, rep.OK(), "%q", rep.Problems)
			require.True(t, rep.Valid)
			require.Equal(t, int64(4096), rep.ChunkSize)
		})
	}
	rep, err := CheckCOW(kernel, 0)
	require.NoError(t, err)
	require.Equal(t, uint64(4), rep.Exceptions)
	require.Equal(t, uint64(1), rep.Leaked, "the kernel's hole at chunk 4")
	require.Equal(t, uint64(7), rep.NextFree)
}

// CheckCOW reports every bad entry, where LoadPersistent stops at the
// first.
func TestCheckCOWReportsEveryProblem(t *testing.T) {
	const chunk = 4096
	img := make([]byte, 64<<10) // 16 chunks
	putKernelHeader(img, 1, 1, chunk/512)
	for i, p := range []kpair{
		{0, 2},   // fine
		{1, 99},  // COW chunk beyond the device
		{2, 1},   // the metadata area
		{3, 2},   // chunk 2 again
		{0, 4},   // origin chunk 0 again
		{900, 5}, // origin chunk beyond a 1 MiB origin
	} {
		putKernelPair(img, chunk, 0, i, p)
	}
	cow := memFrom(t, img, 512)
	_, err := LoadPersistent(cow)
	require.ErrorIs(t, err, ErrCorrupt)
	rep, err := CheckCOW(blockdev.ReadOnly(cow), 1<<20)
	require.NoError(t, err)
	require.Len(t, rep.Problems, 5, "%q", rep.Problems)
	require.Equal(t, uint64(6), rep.Exceptions)
	require.ErrorIs(t, rep.Err(ErrCorrupt), ErrCorrupt)

	// Not a store at all, and an invalidated one.
	rep, err = CheckCOW(blockdevtest.NewMem(t, 64<<10, 512), 0)
	require.NoError(t, err)
	require.Len(t, rep.Problems, 1)
	require.Contains(t, rep.Problems[0], "not a persistent store")
	putKernelHeader(img, 0, 1, chunk/512)
	rep, err = CheckCOW(memFrom(t, img, 512), 0)
	require.NoError(t, err)
	require.True(t, rep.OK())
	require.False(t, rep.Valid)
}

// Snapshot.Check lists every problem of a damaged in-memory state, not
// just the first, and its error carries them all.
func TestSnapshotCheckReportsEveryProblem(t *testing.T) {
	o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
	cow := blockdevtest.NewMem(t, 1<<20, 512)
	s, err := o.CreateSnapshot(cow, Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)
	mustWrite(t, o, blockdevtest.Fill(1, 8192), 0)
	rep, err := s.Check()
	require.NoError(t, err)
	require.True(t, rep.OK())

	p := s.st.(*persistent)
	p.ioMu.Lock()
	p.list = append(p.list, Exception{Old: 9999, New: 2}) // beyond the origin, COW chunk 2 again
	p.ioMu.Unlock()
	rep, err = s.Check()
	require.ErrorIs(t, err, ErrCorrupt)
	var ce *blockdev.CheckError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, rep.Problems, ce.Problems)
	for _, want := range []string{
		"3 exceptions listed, 2 counted",
		"exception 2: origin chunk 9999 beyond 256",
		"COW chunk 2 used twice",
		"exception 9999->2 missing from the lookup table",
		"lookup table holds 2 exceptions, store 3",
		"2 exceptions on disk, 3 in memory",
	} {
		require.Contains(t, rep.Problems, want)
	}
	p.ioMu.Lock()
	p.list = p.list[:2]
	p.ioMu.Unlock()
	require.NoError(t, s.Close())
}
