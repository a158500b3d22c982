package meta

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A commit split into Freeze and Write records the user word, keeps the
// data chunks in flight out of the frozen transaction (a crash after it
// finds them free and no leak) but allocated in the next one, which they
// alone do not make a change to commit, and holds
// freed chunks until ReleaseFrees. MarkData claims only free chunks,
// ReturnData gives back only allocated ones, and Room refuses, changing
// nothing, when the region cannot take the changes.
func TestFreezeWrite(t *testing.T) {
	dev, err := blockdev.NewMem(256*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1000, SyncWriteBack: true})
	require.NoError(t, err)
	ref, err := m.AllocData()
	require.NoError(t, err)
	require.NoError(t, m.Put(Key{B: 0, C: 1, E: 1}, ref))
	inflight, err := m.AllocDataBatch(nil, 3)
	require.NoError(t, err)
	require.Len(t, inflight, 3)
	start := inflight[0]
	require.Equal(t, []uint64{start, start + 1, start + 2}, inflight, "free space in one run is taken in order")
	_, err = m.Freeze(1, []uint64{999})
	require.ErrorIs(t, err, ErrInvalid, "a chunk that is not allocated cannot be in flight")
	fz, err := m.Freeze(42, inflight)
	require.NoError(t, err)
	require.NotNil(t, fz)
	require.NoError(t, fz.Write())
	require.NoError(t, m.Check())
	require.EqualValues(t, 42, m.User())
	fz, err = m.Freeze(42, inflight)
	require.NoError(t, err)
	require.True(t, fz == nil, "chunks held in flight again are no change: nothing to commit")

	// A crash now: the committed transaction has the key and its chunk,
	// and the chunks in flight free.
	after := blockdevtest.MustCrashSim(dev.Size(), 4096)
	_, err = after.WriteAt(blockdevtest.ReadAll(t, dev), 0)
	require.NoError(t, err)
	c, err := Open(after, Options{})
	require.NoError(t, err)
	require.EqualValues(t, 42, c.User())
	require.NoError(t, c.Check())
	require.NoError(t, c.MarkData(start), "a chunk in flight at the freeze is free after a crash")
	require.ErrorIs(t, c.MarkData(ref), ErrInvalid, "a referenced chunk cannot be claimed")
	require.NoError(t, c.Close())

	// Live, the chunks in flight are still allocated, a freed chunk is
	// held until a commit is durable and the frees are released.
	require.ErrorIs(t, m.MarkData(start), ErrInvalid)
	require.NoError(t, m.ReturnData(start))
	require.ErrorIs(t, m.ReturnData(start), ErrInvalid)
	_, err = m.Delete(Key{B: 0, C: 1, E: 1})
	require.NoError(t, err)
	require.NoError(t, m.FreeData(ref))
	require.EqualValues(t, 1, m.DataHeld())
	fz, err = m.Freeze(43, []uint64{start + 1, start + 2})
	require.NoError(t, err)
	require.NoError(t, fz.Write())
	require.EqualValues(t, 1, m.DataHeld(), "held until ReleaseFrees")
	m.ReleaseFrees()
	require.Zero(t, m.DataHeld())
	var inUse []uint64
	require.NoError(t, m.DataInUse(func(loc uint64) bool { inUse = append(inUse, loc); return true }))
	require.Equal(t, []uint64{start + 1, start + 2}, inUse)

	require.ErrorIs(t, m.Room(1<<20, false), ErrNoSpace)
	require.NoError(t, m.Room(1, false))
	require.NoError(t, m.Close())
}

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

// OpenOverlay accepts changes in memory, never writes the device, and
// refuses to commit.
func TestOpenOverlay(t *testing.T) {
	dev, err := blockdev.NewMem(256*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 100})
	require.NoError(t, err)
	require.NoError(t, m.Put(Key{C: 1, E: 1}, LocSpecial))
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())
	before := blockdevtest.ReadAll(t, dev)
	o, err := OpenOverlay(blockdev.ReadOnly(dev), Options{CacheBytes: 8 << 10})
	require.NoError(t, err)
	for c := uint64(2); c < 2000; c++ {
		require.NoError(t, o.Put(Key{C: c, E: 1}, LocSpecial))
	}
	require.EqualValues(t, 1999, o.Len())
	_, err = o.Freeze(1, nil)
	require.ErrorIs(t, err, ErrReadOnly)
	require.NoError(t, o.Close())
	require.Equal(t, before, blockdevtest.ReadAll(t, dev))
}
