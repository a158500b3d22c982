package meta

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Room only reads the space map's counts: it runs beside a lookup that
// holds the layer's lock shared (it used to wait for it, exclusively), and
// its hold is not timed, so a span of shared holds is not stretched by it.
// It still refuses, changing nothing, what the region cannot take.
func TestCloneReadRoomBesideReaders(t *testing.T) {
	dev, err := blockdev.NewMem(256*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1000, SyncWriteBack: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()

	m.mu.RLock() // a lookup in progress
	done := make(chan error, 1)
	go func() { done <- m.Room(1, false) }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Room waited for a shared holder")
	}
	m.mu.RUnlock()
	require.NoError(t, err)

	m.mu.Reset()
	require.NoError(t, m.Room(1, false))
	require.ErrorIs(t, m.Room(1<<20, false), ErrNoSpace)
	st := m.mu.Stats()
	require.Zero(t, st.MaxHold, "Room takes no exclusive hold")
	require.Zero(t, st.MaxShared, "Room's shared hold is not timed")
}
