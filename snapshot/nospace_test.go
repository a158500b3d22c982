package snapshot

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestNoSpace fills a tiny store: with NoSpaceFailWrite the origin write
// fails and nothing changes; with NoSpaceInvalidate the snapshots needing
// the copy are deleted and the write goes through.
func TestNoSpace(t *testing.T) {
	for _, policy := range []NoSpacePolicy{NoSpaceFailWrite, NoSpaceInvalidate} {
		// 4 KiB chunks; the data region holds 16 of them, after the
		// superblock and the smallest metadata region.
		s, _, _ := newMemStore(t, 256<<10, 4096+minMetaBytes+16*4096, Options{ChunkSize: 4096, Transient: true, NoSpace: policy})
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
		// The refused write aims at chunk 16: read it on the origin and on
		// every snapshot before and after.
		target := func() map[string][]byte {
			m := map[string][]byte{"origin": readChunk(t, o, 16)}
			for _, vi := range s.List() {
				if vi.Kind != KindSnapshot {
					continue
				}
				v, err := s.OpenID(vi.ID)
				require.NoError(t, err)
				m[vi.Name] = readChunk(t, v, 16)
				require.NoError(t, v.Close())
			}
			return m
		}
		aimed := target()
		require.Len(t, aimed, 2)
		refused := bytes.Repeat([]byte{0xa5}, 4096)
		require.NotEqual(t, refused, aimed["origin"])
		_, err = o.WriteAt(refused, 16*4096)
		if policy == NoSpaceFailWrite {
			require.ErrorIs(t, err, ErrNoSpace)
			require.Equal(t, aimed, target(), "chunk 16 changed")
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

func readChunk(t testing.TB, v *Volume, c int64) []byte {
	t.Helper()
	p := make([]byte, 4096)
	_, err := v.ReadAt(p, c*4096)
	require.NoError(t, err)
	return p
}
