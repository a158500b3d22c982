package blockdevtest_test

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func TestNull(t *testing.T) {
	const size = int64(1) << 50 // a petabyte costs nothing
	d, err := blockdevtest.NewNull(size, 4096)
	require.NoError(t, err)
	require.Equal(t, size, d.Size())
	require.Equal(t, 4096, d.BlockSize())

	p := bytes.Repeat([]byte{0xab}, 8192)
	_, err = d.WriteAt(p, size-8192)
	require.NoError(t, err)
	require.EqualValues(t, 1, d.Writes())
	_, err = d.ReadAt(p, size-8192)
	require.NoError(t, err)
	require.True(t, blockdev.IsZero(p), "a Null device reads zeros after a write")

	_, err = d.WriteAt(p[:100], 0)
	require.ErrorIs(t, err, blockdev.ErrMisaligned)
	_, err = d.ReadAt(p, size-4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	require.ErrorIs(t, d.Discard(size, 4096), blockdev.ErrOutOfRange)
	require.NoError(t, d.Discard(0, 4096))
	require.NoError(t, d.Flush())
	require.EqualValues(t, 1, d.Writes(), "failed writes are not counted")

	require.NoError(t, d.Close())
	require.ErrorIs(t, d.Close(), blockdev.ErrClosed)
	_, err = d.ReadAt(p, 0)
	require.ErrorIs(t, err, blockdev.ErrClosed)
	_, err = d.WriteAt(p, 0)
	require.ErrorIs(t, err, blockdev.ErrClosed)
	require.ErrorIs(t, d.Flush(), blockdev.ErrClosed)

	_, err = blockdevtest.NewNull(4096, 1000)
	require.ErrorIs(t, err, blockdev.ErrNotSupported)
	_, err = blockdevtest.NewNull(4097, 4096)
	require.ErrorIs(t, err, blockdev.ErrMisaligned)
}
