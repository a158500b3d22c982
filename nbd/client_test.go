package nbd

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func TestClientSmoke(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "a", Device: blockdevtest.NewMem(t, 1<<20, 512)})
	c := dial(t, ts.uri("a"))
	p := bytes.Repeat([]byte{7}, 8192)
	_, err := c.WriteAt(p, 4096)
	require.NoError(t, err)
	q := make([]byte, 8192)
	_, err = c.ReadAt(q, 4096)
	require.NoError(t, err)
	require.Equal(t, p, q)
	require.NoError(t, c.Flush())
	info := c.Info()
	require.True(t, info.Structured)
	require.True(t, info.BlockStatus)
	require.Equal(t, int64(1<<20), info.Size)
}

func TestClientConformance(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		t.Run(map[int]string{512: "bs=512", 4096: "bs=4096"}[bs], func(t *testing.T) {
			blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
				ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, 4<<20, bs)})
				c, err := Dial(t.Context(), ts.uri("m"))
				require.NoError(t, err)
				return c
			})
		})
	}
}

func TestClientConformanceReadOnly(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		ts := startServer(t, Options{}, Export{Name: "ro", Device: blockdevtest.NewMem(t, 1<<20, 512), ReadOnly: true})
		c, err := Dial(t.Context(), ts.uri("ro"))
		require.NoError(t, err)
		return c
	})
}

func TestClientMapAllocation(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, 8<<20, 512)})
	c := dial(t, ts.uri("m"))
	checkAllocation(t, c)
	// Without the metadata context everything reads as allocated.
	ts2 := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewFaulty(blockdevtest.NewMem(t, 8<<20, 512))})
	c2 := dial(t, ts2.uri("m"))
	l, st, err := c2.MapAllocation(0, 8<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, st)
	require.Equal(t, int64(8<<20), l)
}
