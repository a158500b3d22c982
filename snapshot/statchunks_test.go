package snapshot

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// Stats counts space in bytes; these give older tests their counts in
// chunks.

func (st Stats) usedChunks() uint64    { return uint64(st.UsedBytes / st.ChunkSize) }
func (st Stats) dataChunks() uint64    { return uint64(st.DataBytes / st.ChunkSize) }
func (st Stats) bufferedChunks() int64 { return st.BufferedBytes / st.ChunkSize }

func TestInfoParentName(t *testing.T) {
	s := protectTree(t)
	byName := map[string]VolumeInfo{}
	for _, v := range s.ListAll() {
		byName[v.Name] = v
	}
	require.Equal(t, "", byName["origin"].ParentName)
	require.Equal(t, "origin", byName["golden"].ParentName)
	require.Equal(t, "golden", byName["vm1"].ParentName)
	require.Equal(t, "vm1", byName["vm1s"].ParentName)
	require.Equal(t, "vm1s", byName["vm1c"].ParentName)
	// A clone of a live volume has a hidden parent: no name, an ID.
	c, err := s.CreateClone("direct", s.Origin())
	require.NoError(t, err)
	info := c.Info()
	require.NotZero(t, info.Parent)
	require.Equal(t, "", info.ParentName)

	st := s.Stats()
	require.Equal(t, st.DataBytes, st.UsedBytes+st.FreeBytes)
	require.Equal(t, int64(0), st.DataBytes%st.ChunkSize)
	require.Equal(t, int64(7), st.Volumes) // origin, golden, vm1, vm1s, vm1c, vm2, direct
}

// skipUnderRace skips a long single-threaded test in the short race run
// (race_test.go says why).
func skipUnderRace(t *testing.T) {
	t.Helper()
	if raceEnabled && testing.Short() {
		t.Skip("long single-threaded fill: run without -race (make unit), or with -race without -short")
	}
}
