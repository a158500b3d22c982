package snapshot

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// newMemStore formats a store over fresh Mem devices; the origin holds a
// pattern. Closed at the end of the test.
func newMemStore(t testing.TB, originSize, storeSize int64, opts Options) (*Store, *blockdev.Mem, *blockdev.Mem) {
	t.Helper()
	origin, err := blockdev.NewMem(originSize, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(storeSize, 4096)
	require.NoError(t, err)
	fillPattern(t, origin, 1)
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, origin, store
}

func fillPattern(t testing.TB, d blockdev.Device, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	buf := make([]byte, 64<<10)
	for off := int64(0); off < d.Size(); off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		n := min(int64(len(buf)), d.Size()-off)
		_, err := d.WriteAt(buf[:n], off)
		require.NoError(t, err)
	}
}

func conformanceModes() []struct {
	name string
	opts Options
} {
	return []struct {
		name string
		opts Options
	}{
		{"journal", Options{ChunkSize: 16 << 10}},
		{"transient", Options{ChunkSize: 64 << 10, Transient: true}},
	}
}

func TestConformance(t *testing.T) {
	for i, m := range conformanceModes() {
		t.Run(m.name, func(t *testing.T) {
			if testing.Short() && i > 0 {
				t.Skip("-short: the journaled mode covers the I/O paths; the plain run covers every mode")
			}
			t.Run("origin", func(t *testing.T) {
				blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
					s, _, _ := newMemStore(t, 8<<20, 32<<20, m.opts)
					_, err := s.CreateSnapshot("s1", s.Origin())
					require.NoError(t, err)
					return s.Origin()
				})
			})
			t.Run("snapshot", func(t *testing.T) {
				blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
					s, _, _ := newMemStore(t, 8<<20, 32<<20, m.opts)
					snap, err := s.CreateSnapshot("s1", s.Origin())
					require.NoError(t, err)
					// Make the snapshot differ from the origin in places.
					_, err = s.Origin().WriteAt(make([]byte, 1<<20), 1<<20)
					require.NoError(t, err)
					return snap
				})
			})
			t.Run("clone", func(t *testing.T) {
				blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
					s, _, _ := newMemStore(t, 8<<20, 48<<20, m.opts)
					snap, err := s.CreateSnapshot("s1", s.Origin())
					require.NoError(t, err)
					c, err := s.CreateClone("c1", snap)
					require.NoError(t, err)
					_, err = s.CreateSnapshot("c1-s1", c) // redirect-on-write keeps it intact
					require.NoError(t, err)
					return c
				})
			})
			t.Run("clone-of-clone", func(t *testing.T) {
				blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
					s, _, _ := newMemStore(t, 8<<20, 48<<20, m.opts)
					c1, err := s.CreateClone("c1", s.Origin())
					require.NoError(t, err)
					_, err = c1.WriteAt(make([]byte, 64<<10), 128<<10)
					require.NoError(t, err)
					c2, err := s.CreateClone("c2", c1)
					require.NoError(t, err)
					return c2
				})
			})
		})
	}
}

func mustCheck(t testing.TB, s *Store) {
	t.Helper()
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Check())
}

// The origin's creation time is the store's format time, recorded in the
// superblock, not the time of the latest Open.
func TestOriginCreatedSurvivesReopen(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 8<<20, Options{})
	created := s.Origin().Info().Created
	require.False(t, created.IsZero())
	snap, err := s.CreateSnapshot("s", s.Origin())
	require.NoError(t, err)
	require.False(t, snap.Info().Created.Before(created), "a snapshot is never older than its origin")
	require.NoError(t, s.Close())
	s2, err := Open(origin, store, Options{})
	require.NoError(t, err)
	defer s2.Close()
	require.True(t, created.Equal(s2.Origin().Info().Created), "created %v, after reopen %v", created, s2.Origin().Info().Created)
}
