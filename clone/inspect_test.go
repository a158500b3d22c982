package clone

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Inspect reads the metadata device alone, read-only: the geometry and the
// hydrated count a later Open recovers; an unsynced session left open; a
// damaged superblock as a problem, not an error.
func TestInspectMetadataAlone(t *testing.T) {
	const size = 2 << 20
	src, _ := newSource(t, size, 512)
	dst, meta := blockdevtest.NewMem(t, size, 4096), blockdevtest.NewMem(t, MetadataSize(size, 0), 4096)
	c, err := Create(src, dst, meta, Options{NoHydration: true, NoMetadataSync: true})
	require.NoError(t, err)
	_, err = c.WriteAt(bytes.Repeat([]byte{1}, 128<<10), 256<<10)
	require.NoError(t, err)
	crashed := meta.Clone() // power cut with the unsynced session open
	want := c.Status().Hydrated
	require.NoError(t, c.Close())
	before := blockdevtest.ReadAll(t, meta)

	info, err := Inspect(blockdev.ReadOnly(meta))
	require.NoError(t, err)
	require.True(t, info.OK(), "%q", info.Problems)
	require.Equal(t, int64(DefaultRegionSize), info.RegionSize)
	require.Equal(t, int64(size), info.SourceSize)
	require.Equal(t, int64(size), info.DestSize)
	require.Equal(t, 512, info.SourceBlock)
	require.Equal(t, 4096, info.DestBlock)
	require.Equal(t, uint64(32), info.Regions)
	require.Equal(t, want, info.Hydrated)
	require.Equal(t, uint64(2), info.Hydrated)
	require.False(t, info.Unclean)
	require.Equal(t, before, blockdevtest.ReadAll(t, meta))

	info, err = Inspect(blockdev.ReadOnly(crashed))
	require.NoError(t, err)
	require.True(t, info.Unclean)

	// Both copies of the journal's superblock gone: a problem.
	broken := meta.Clone()
	_, err = broken.WriteAt(make([]byte, 8192), superArea)
	require.NoError(t, err)
	info, err = Inspect(broken)
	require.NoError(t, err)
	require.Len(t, info.Problems, 1)
	require.Contains(t, info.Problems[0], "journal")
	require.Equal(t, uint64(32), info.Regions, "the geometry is still known")

	_, err = meta.WriteAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	info, err = Inspect(meta)
	require.NoError(t, err)
	require.Len(t, info.Problems, 1)
	require.Contains(t, info.Problems[0], "superblock")
}
