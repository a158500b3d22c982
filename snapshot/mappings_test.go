package snapshot

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Every volume reads, within its mappings, the store bytes they name (or
// zeros), and outside them the origin device's bytes; runs are merged and
// in order. On a read-only open too.
func TestMappingsSayWhereDataLives(t *testing.T) {
	s, origin, store := newMemStore(t, 4<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	fillAt(t, o, 1, 0, 64<<10) // four chunks copied for s1, in order
	fillAt(t, o, 2, 1<<20, 16<<10)
	c, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	fillAt(t, c, 3, 2<<20, 32<<10)
	require.NoError(t, c.Discard(3<<20, 16<<10))
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	require.NoError(t, s.Close())

	ro, err := Open(blockdev.ReadOnly(origin), blockdev.ReadOnly(store), Options{ReadOnly: true})
	require.NoError(t, err)
	defer ro.Close()
	for _, name := range []string{"origin", "s1", "c", "s2"} {
		v := mustOpen(t, ro, name)
		maps, err := ro.Mappings(v)
		require.NoError(t, err)
		img := blockdevtest.ReadAll(t, v)
		covered := make([]bool, len(img))
		for i, m := range maps {
			if i > 0 {
				p := maps[i-1]
				require.Greater(t, m.Off, p.Off)
				require.False(t, p.Off+p.Len == m.Off && p.Zero == m.Zero && (m.Zero || p.StoreOff+p.Len == m.StoreOff), "unmerged runs %v %v", p, m)
			}
			want := make([]byte, m.Len)
			if !m.Zero {
				_, err := store.ReadAt(want, m.StoreOff)
				require.NoError(t, err)
			}
			require.Equal(t, want, img[m.Off:m.Off+m.Len], "%s: mapping %+v", name, m)
			for j := m.Off; j < m.Off+m.Len; j++ {
				covered[j] = true
			}
		}
		base := blockdevtest.ReadAll(t, origin)
		for j := range img {
			if !covered[j] && img[j] != base[j] {
				t.Fatalf("%s: byte %d outside every mapping differs from the origin device", name, j)
			}
		}
		switch name {
		case "origin", "s2":
			require.Empty(t, maps)
		case "s1":
			require.Equal(t, []Mapping{{Off: 0, Len: 64 << 10, StoreOff: maps[0].StoreOff}, {Off: 1 << 20, Len: 16 << 10, StoreOff: maps[1].StoreOff}}, maps)
		case "c":
			require.Len(t, maps, 4) // s1's two runs, its own write, its discard
			require.True(t, maps[3].Zero)
		}
	}
}
