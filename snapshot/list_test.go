package snapshot

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// ListAll shows the hidden snapshots clones hang from (an implicit one, and
// a deleted snapshot that clones keep), so every parent it names is in it;
// List does not; a hidden snapshot goes with its last clone.
func TestListAllShowsHidden(t *testing.T) {
	s, _, _ := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	live, err := s.CreateClone("live", s.Origin()) // through an implicit snapshot
	require.NoError(t, err)
	gold, err := s.CreateSnapshot("gold", s.Origin())
	require.NoError(t, err)
	vm, err := s.CreateClone("vm", gold)
	require.NoError(t, err)
	_, err = s.DeleteWith("gold", DeleteOptions{Detach: true}) // vm keeps it, hidden
	require.NoError(t, err)

	visible := map[uint64]bool{}
	for _, i := range s.List() {
		require.False(t, i.Hidden)
		visible[i.ID] = true
	}
	all := s.ListAll()
	byID := map[uint64]VolumeInfo{}
	for _, i := range all {
		byID[i.ID] = i
		require.Equal(t, !visible[i.ID], i.Hidden, "%+v", i)
		if i.Hidden {
			require.Empty(t, i.Name)
			require.Equal(t, KindSnapshot, i.Kind)
		}
	}
	require.Len(t, all, len(visible)+2)
	for _, i := range all {
		if i.Parent != 0 {
			require.Contains(t, byID, i.Parent, "the parent of %+v is listed", i)
		}
	}
	require.True(t, byID[live.Info().Parent].Hidden)
	require.Equal(t, originVolumeID, int(byID[live.Info().Parent].Parent))
	require.True(t, byID[vm.Info().Parent].Hidden)
	require.Equal(t, gold.ID(), vm.Info().Parent)

	d, err := s.Delete("vm")
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	require.NotContains(t, idsOf(s.ListAll()), gold.ID(), "the hidden snapshot went with its last clone")
	require.Contains(t, idsOf(s.ListAll()), live.Info().Parent)
}

func idsOf(vs []VolumeInfo) []uint64 {
	var out []uint64
	for _, v := range vs {
		out = append(out, v.ID)
	}
	return out
}
