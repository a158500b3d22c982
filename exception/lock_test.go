package exception

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// An origin and a COW device are each used by one Origin or Snapshot at a
// time: a second one over the same file fails with ErrLocked until the
// first closes; failed opens keep no lock.
func TestOriginAndCOWLocked(t *testing.T) {
	dir := t.TempDir()
	originPath, cowPath := filepath.Join(dir, "origin"), filepath.Join(dir, "cow")
	o := newOrigin(t, blockdevtest.CreateFile(t, originPath, 1<<20))
	cow := blockdevtest.CreateFile(t, cowPath, 1<<20)
	s, err := o.CreateSnapshot(cow, Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)

	_, err = NewOrigin(blockdevtest.OpenFile(t, originPath, false), OriginOptions{})
	require.ErrorIs(t, err, ErrLocked)
	require.Contains(t, err.Error(), "origin device: blockdev: "+originPath+" is locked by another user")
	_, err = NewOrigin(blockdevtest.OpenFile(t, originPath, true), OriginOptions{})
	require.ErrorIs(t, err, ErrLocked, "a read-only origin takes a shared lock, which a writer excludes")

	other := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
	_, err = other.OpenSnapshot(blockdevtest.OpenFile(t, cowPath, false), Options{})
	require.ErrorIs(t, err, ErrLocked)
	_, err = other.CreateSnapshot(blockdevtest.OpenFile(t, cowPath, false), Options{ChunkSize: 4096, Persistent: true})
	require.ErrorIs(t, err, ErrLocked, "and nothing was formatted over the snapshot in use")
	require.Len(t, other.Snapshots(), 0)

	require.NoError(t, s.Close())
	s2, err := other.OpenSnapshot(blockdevtest.OpenFile(t, cowPath, false), Options{})
	require.NoError(t, err, "Close released the COW device")
	require.NoError(t, s2.Close())
	require.NoError(t, o.Close())
	o2, err := NewOrigin(blockdevtest.OpenFile(t, originPath, false), OriginOptions{})
	require.NoError(t, err, "Close released the origin")
	require.NoError(t, o2.Close())

	// Read-only origins share.
	a, err := NewOrigin(blockdevtest.OpenFile(t, originPath, true), OriginOptions{})
	require.NoError(t, err)
	b, err := NewOrigin(blockdevtest.OpenFile(t, originPath, true), OriginOptions{})
	require.NoError(t, err)
	require.NoError(t, a.Close())
	require.NoError(t, b.Close())
}
