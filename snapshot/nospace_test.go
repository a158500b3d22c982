package snapshot

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestNoSpace fills a tiny store: with NoSpaceFailWrite the origin write
// fails and nothing changes; with NoSpaceInvalidate the snapshots needing
// the copy are deleted and the write goes through.
func TestNoSpace(t *testing.T) {
	for _, policy := range []NoSpacePolicy{NoSpaceFailWrite, NoSpaceInvalidate} {
		// 4 KiB chunks; the data region holds 16 of them.
		s, _, _ := newMemStore(t, 256<<10, 4096+16*4096, Options{ChunkSize: 4096, Transient: true, NoSpace: policy})
		o := s.Origin()
		snap, err := s.CreateSnapshot("s", o)
		require.NoError(t, err)
		before := make([]byte, 64<<10)
		_, err = snap.ReadAt(before, 0)
		require.NoError(t, err)
		buf := make([]byte, 4096)
		for c := range 16 {
			_, err := o.WriteAt(buf, int64(c)*4096)
			require.NoError(t, err)
		}
		_, err = o.WriteAt(buf, 16*4096)
		if policy == NoSpaceFailWrite {
			require.ErrorIs(t, err, ErrNoSpace)
			got := make([]byte, 64<<10)
			_, err = snap.ReadAt(got, 0)
			require.NoError(t, err)
			require.Equal(t, before, got)
		} else {
			require.NoError(t, err)
			_, err = snap.ReadAt(buf, 0)
			require.ErrorIs(t, err, ErrInvalidSnapshot)
			_, err = s.OpenVolume("s")
			require.ErrorIs(t, err, ErrNotFound)
		}
		mustCheck(t, s)
	}
}
