package nbd

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestClientMapAllocationKeepsExtents: walking an export of 64 data
// extents and 64 holes in order takes one BLOCK_STATUS round trip, not one
// per extent, and every answer is right; a write through the client drops
// what was kept, so the next answer sees it.
func TestClientMapAllocationKeepsExtents(t *testing.T) {
	const size, ext = 8 << 20, 64 << 10
	mem := blockdevtest.NewMem(t, size, 4096)
	data := bytes.Repeat([]byte{0x5c}, ext)
	for off := int64(ext); off < size; off += 2 * ext {
		_, err := mem.WriteAt(data, off)
		require.NoError(t, err)
	}
	ts := startServer(t, Options{}, Export{Name: "m", Device: mem})
	c := dial(t, ts.uri("m"))
	require.True(t, c.Info().BlockStatus)
	sent := func() uint64 { return c.lanes[0].handles.Load() }
	before := sent()
	for off := int64(0); off < size; {
		n, st, err := c.MapAllocation(off, size-off)
		require.NoError(t, err)
		want := blockdev.Hole
		if off/ext%2 == 1 {
			want = blockdev.Allocated
		}
		require.Equal(t, want, st, "at %d", off)
		require.EqualValues(t, ext, n, "at %d", off)
		off += n
	}
	require.EqualValues(t, 1, sent()-before, "requests for 128 extents")

	// A hole answered from what was kept, then written: asked again, it
	// is data.
	_, st, err := c.MapAllocation(0, size)
	require.NoError(t, err)
	require.Equal(t, blockdev.Hole, st)
	_, err = c.WriteAt(data[:4096], 2*ext)
	require.NoError(t, err)
	n, st, err := c.MapAllocation(2*ext, size-2*ext)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, st)
	require.EqualValues(t, 4096, n)
	// A range that starts mid-extent, and one cut short by n.
	n, st, err = c.MapAllocation(ext+4096, 8192)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, st)
	require.EqualValues(t, 8192, n)
	n, st, err = c.MapAllocation(4*ext+4096, size-4*ext-4096)
	require.NoError(t, err)
	require.Equal(t, blockdev.Hole, st)
	require.EqualValues(t, ext-4096, n)
}
