package blockdevtest_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Split sends an I/O below At to Head and one at or above it to Tail (a
// data-less Null here, which reads zeros), and refuses one that crosses At.
func TestSplit(t *testing.T) {
	head := blockdevtest.NewMem(t, 8192, 4096)
	tail, err := blockdevtest.NewNull(8192, 4096)
	require.NoError(t, err)
	d := &blockdevtest.Split{Head: head, Tail: tail, At: 8192}
	require.EqualValues(t, 16384, d.Size())
	require.Equal(t, 4096, d.BlockSize())

	data := blockdevtest.Fill(7, 4096)
	_, err = d.WriteAt(data, 4096)
	require.NoError(t, err)
	got := make([]byte, 4096)
	_, err = head.ReadAt(got, 4096)
	require.NoError(t, err)
	require.Equal(t, data, got, "a write below At lands on Head")

	_, err = d.WriteAt(data, 8192)
	require.NoError(t, err)
	_, err = d.ReadAt(got, 8192)
	require.NoError(t, err)
	require.Equal(t, make([]byte, 4096), got, "a write at At goes to Tail (a Null drops it)")

	_, err = d.WriteAt(make([]byte, 8192), 4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange, "an I/O across At")
	_, err = d.ReadAt(make([]byte, 8192), 4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	require.ErrorIs(t, d.Discard(4096, 8192), blockdev.ErrOutOfRange)
	require.NoError(t, d.Discard(8192, 4096))
	require.NoError(t, d.Flush())
}
