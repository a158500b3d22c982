package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// reserveLen is how many chunks the allocator holds for the next copies.
func (a *allocator) reserveLen() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.reserve) - a.next
}

// The allocator's reserve is allocated in the layer but counted free by
// Stats, and a tree commit, then a crash, shows it free: nothing leaks,
// and the copies taken from it are where they should be.
func TestAllocReserveFreeInStatsAndAfterCrash(t *testing.T) {
	s, oSim, sSim, opts := smallCrashStore(t)
	var err error
	o := s.Origin()
	free0 := s.Stats().FreeBytes
	old := bytes.Repeat([]byte{7}, 16*4096)
	_, err = o.WriteAt(old, 0)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	_, err = s.CreateSnapshot("s", o)
	require.NoError(t, err)
	chunkWriter(t, o)(0, 5, 9) // three copies
	require.Equal(t, allocReserve-3, s.alloc.reserveLen(), "one batch served the three copies")
	st := s.Stats()
	require.EqualValues(t, 3*4096, st.UsedBytes, "the reserve is not used space")
	require.Equal(t, free0-3*4096, st.FreeBytes)
	require.NoError(t, s.Check())
	require.NoError(t, s.Checkpoint(context.Background())) // a tree commit with the reserve in it

	o2, s2 := oSim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop}), sSim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	_ = s.Close()
	s, err = Open(o2, s2, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	require.NoError(t, s.Check(), "the reserve is free after the crash, not leaked")
	st = s.Stats()
	require.EqualValues(t, 3*4096, st.UsedBytes)
	require.Equal(t, free0-3*4096, st.FreeBytes)
	snap, err := s.OpenVolume("s")
	require.NoError(t, err)
	chunkWriter(t, s.Origin())(5)
	got := make([]byte, len(old))
	_, err = snap.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, old, got, "the snapshot keeps the origin's data before the writes")
	require.NoError(t, s.Check())
}

// GrowMetadata needs a run of free chunks at the top of the data space;
// the reserve, counted free, is given back first, so the whole free space
// can go to the region.
func TestAllocReserveGoesToGrowMetadata(t *testing.T) {
	s, _, _ := newMemStore(t, 4<<20, 3<<20, Options{ChunkSize: 4096, CommitInterval: -1, JournalSize: 256 << 10, MetadataBytes: 1 << 20})
	o := s.Origin()
	_, err := s.CreateSnapshot("s", o)
	require.NoError(t, err)
	free := s.Stats().FreeBytes / 4096
	require.Greater(t, free, int64(allocReserve))
	// Copies until the reserve holds every free chunk but a few.
	n := int(free) - allocReserve + 1
	w := chunkWriter(t, o)
	for c := 0; c < n; c++ {
		w(c)
	}
	r := s.alloc.reserveLen()
	require.Positive(t, r)
	free = s.Stats().FreeBytes / 4096
	require.Greater(t, free, int64(r-1), "the reserve is counted free")
	got, err := s.GrowMetadata(context.Background(), free*4096)
	require.NoError(t, err, "the reserve's chunks go to the region")
	require.Equal(t, free*4096, got)
	require.Zero(t, s.Stats().FreeBytes)
	require.Zero(t, s.alloc.reserveLen())
	_, err = o.WriteAt(make([]byte, 4096), int64(n)*4096)
	require.ErrorIs(t, err, ErrNoSpace)
	mustCheck(t, s)
}
