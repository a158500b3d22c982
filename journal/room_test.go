package journal

import (
	"context"
	"io"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/stretchr/testify/require"
)

// Room says whether Append would find log space without waiting: false
// exactly when Append would wait, true again once a checkpoint freed the
// log.
func TestRoomMatchesAppendWait(t *testing.T) {
	dev, err := blockdev.NewMem(64<<10, 4096)
	require.NoError(t, err)
	j, err := Format(dev, Options{CheckpointSize: 8 << 10})
	require.NoError(t, err)
	defer func() { _ = j.Close() }()
	full, cancel := context.WithCancel(context.Background())
	cancel()
	rec := make([]byte, 100)
	require.True(t, j.Room(len(rec)))
	for j.Room(len(rec)) {
		_, err := j.Append(full, rec) // never waits while Room is true
		require.NoError(t, err)
	}
	_, err = j.Append(full, rec)
	require.ErrorIs(t, err, context.Canceled, "Append would have waited")
	require.NoError(t, j.Checkpoint(context.Background(), j.LastSeq(), func(w io.Writer) error { return nil }))
	require.True(t, j.Room(len(rec)))
}
