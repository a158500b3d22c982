package snapshot

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Review of the identity region (owner record, origin fingerprint) where it
// meets stores written before it existed and Migrate.

// otherOrigin returns a device of origin's size whose every block differs
// from origin's.
func otherOrigin(t *testing.T, origin blockdev.Device) *blockdev.Mem {
	t.Helper()
	b := readAll(t, origin)
	for i := range b {
		b[i] ^= 0xa5
	}
	m, err := blockdev.NewMem(origin.Size(), origin.BlockSize())
	require.NoError(t, err)
	_, err = m.WriteAt(b, 0)
	require.NoError(t, err)
	return m
}

// A store with blank volumes (one written past the origin's end) and
// snapshots records the origin's fingerprint: another origin of the same
// size is refused read-write and read-only, and the store's own opens
// with every volume as it was. Migrate's store does too (below).
func TestReviewIdentityWithPool(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	fillAt(t, s.Origin(), 3, 0, 256<<10)
	_, err := s.CreateSnapshot("s1", s.Origin())
	require.NoError(t, err)
	fillAt(t, s.Origin(), 4, 0, 64<<10)
	v, err := s.CreateVolume("blank", 2<<20)
	require.NoError(t, err)
	fillAt(t, v, 5, 3<<19, 64<<10) // past the origin's end
	_, err = s.CreateSnapshot("blank@1", v)
	require.NoError(t, err)
	want := map[string][]byte{}
	for _, i := range s.List() {
		want[i.Name] = readAll(t, mustOpen(t, s, i.Name))
	}
	require.NoError(t, s.Close())
	requireIdentity(t, origin, store, want)
}

// requireIdentity opens the store read-write (recording the identity),
// checks its volumes against want, and sees another origin refused.
func requireIdentity(t *testing.T, origin, store blockdev.Device, want map[string][]byte) {
	t.Helper()
	s, err := Open(origin, store, Options{})
	require.NoError(t, err)
	require.NoError(t, s.Check())
	for name, b := range want {
		require.Equal(t, b, readAll(t, mustOpen(t, s, name)), name)
	}
	require.NoError(t, s.Close())
	_, err = Open(otherOrigin(t, origin), store, Options{})
	require.ErrorIs(t, err, ErrWrongOrigin)
	_, err = Open(otherOrigin(t, origin), store, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrWrongOrigin, "read-only")
	s, err = Open(origin, store, Options{})
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

func TestReviewIdentityAfterMigrate(t *testing.T) {
	origin, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 3)
	old, want := v1Store(t, origin)
	dst, err := blockdev.NewMem(8<<20, 512)
	require.NoError(t, err)
	require.NoError(t, Migrate(origin, blockdev.ReadOnly(old), dst, Options{}))
	requireIdentity(t, origin, dst, want)
}
