package clone

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A second Create or Open of a clone's devices while a Clone has them is
// refused with ErrLocked naming the device; read-only opens share the
// locks with each other but not with a writer; Close releases them, and
// an Open that fails releases what it locked.
func TestSecondOpenRefused(t *testing.T) {
	src, _ := newSource(t, 1<<20, 512)
	dst := blockdevtest.NewMem(t, 1<<20, 4096)
	meta := blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 512)
	opts := Options{NoHydration: true}
	c, err := Create(src, dst, meta, opts)
	require.NoError(t, err)
	_, err = Open(src, dst, meta, opts)
	require.ErrorIs(t, err, ErrLocked)
	require.ErrorContains(t, err, "clone: metadata device: blockdev: memory device is locked by another user")
	_, err = Create(src, dst, meta, opts)
	require.ErrorIs(t, err, ErrLocked)
	other := blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 512)
	_, err = Create(src, dst, other, opts)
	require.ErrorIs(t, err, ErrLocked, "the destination is locked too")
	require.ErrorContains(t, err, "clone: destination device")
	require.NoError(t, c.Close())

	ro := Options{ReadOnly: true}
	a, err := Open(src, dst, meta, ro)
	require.NoError(t, err)
	b, err := Open(src, dst, meta, ro)
	require.NoError(t, err, "read-only opens share")
	_, err = Open(src, dst, meta, opts)
	require.ErrorIs(t, err, ErrLocked, "but keep a writer out")
	require.NoError(t, a.Close())
	require.NoError(t, b.Close())

	_, err = Open(src, dst, other, opts) // no clone on other
	require.ErrorIs(t, err, ErrCorrupt)
	c, err = Open(src, dst, meta, opts)
	require.NoError(t, err, "Close and the failed Open released the locks")
	require.NoError(t, c.Close())
}

// Across handles on the same files (as two processes would hold them) the
// flock refuses the second Open.
func TestSecondOpenOfFilesRefused(t *testing.T) {
	dir := t.TempDir()
	src, _ := newSource(t, 1<<20, 512)
	paths := []string{filepath.Join(dir, "dst"), filepath.Join(dir, "meta")}
	sizes := []int64{1 << 20, MetadataSize(1<<20, 0)}
	open := func() (dst, meta *blockdev.File) {
		var fs [2]*blockdev.File
		for i, p := range paths {
			f, err := blockdev.Open(p, blockdev.FileOptions{})
			require.NoError(t, err)
			t.Cleanup(func() { _ = f.Close() })
			fs[i] = f
		}
		return fs[0], fs[1]
	}
	for i, p := range paths {
		f, err := blockdev.Create(p, sizes[i], blockdev.FileOptions{})
		require.NoError(t, err)
		require.NoError(t, f.Close())
	}
	dst, meta := open()
	c, err := Create(src, dst, meta, Options{NoHydration: true})
	require.NoError(t, err)
	dst2, meta2 := open()
	_, err = Open(src, dst2, meta2, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.ErrorContains(t, err, paths[1]+" is locked by another user")
	require.NoError(t, c.Close())
	c, err = Open(src, dst2, meta2, Options{})
	require.NoError(t, err)
	require.NoError(t, c.Close())
}
