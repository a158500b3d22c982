package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// roFixture builds a closed store with an origin, snapshots, a clone with
// its own writes and discards, and a deleted snapshot; it returns the
// devices.
func roFixture(t *testing.T) (*blockdev.Mem, *blockdev.Mem) {
	t.Helper()
	s, origin, store := newMemStore(t, 4<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	fillAt(t, o, 1, 0, 64<<10)
	require.NoError(t, o.Discard(1<<20, 32<<10))
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	c, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	fillAt(t, c, 2, 512<<10, 48<<10)
	require.NoError(t, c.Discard(2<<20, 16<<10))
	_, err = s.CreateSnapshot("cs", c)
	require.NoError(t, err)
	fillAt(t, o, 3, 3<<20, 16<<10)
	gone, err := s.CreateSnapshot("gone", o)
	require.NoError(t, err)
	fillAt(t, o, 4, 3<<20, 16<<10)
	_, err = s.Delete(gone.Info().Name)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	return origin, store
}

// volumeImages reads every volume of s.
func volumeImages(t *testing.T, s *Store) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, vi := range s.List() {
		v := mustOpen(t, s, vi.Name)
		out[vi.Name] = blockdevtest.ReadAll(t, v)
		require.NoError(t, v.Close())
	}
	return out
}

// A store opened with Options.ReadOnly over read-only views of its devices
// lists, stats, reads, diffs, exports and checks; every change fails with
// ErrReadOnly; the devices keep every byte; a read-write open afterwards
// sees the same volumes.
func TestReadOnlyOpenWritesNothing(t *testing.T) {
	ctx := context.Background()
	origin, store := roFixture(t)
	before := [2][]byte{blockdevtest.ReadAll(t, origin), blockdevtest.ReadAll(t, store)}

	_, err := Open(blockdev.ReadOnly(origin), blockdev.ReadOnly(store), Options{})
	require.ErrorIs(t, err, blockdev.ErrReadOnly, "a read-write open writes a journal epoch")
	_, err = Format(origin, store, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrBadOptions)

	s, err := Open(blockdev.ReadOnly(origin), blockdev.ReadOnly(store), Options{ReadOnly: true})
	require.NoError(t, err)
	require.NoError(t, s.Check())
	require.True(t, s.CheckReport().OK())
	names := []string{}
	for _, vi := range s.List() {
		names = append(names, vi.Name)
		_, err := s.Stat(vi.Name)
		require.NoError(t, err)
	}
	require.Equal(t, []string{"origin", "s1", "s2", "c", "cs"}, names)
	images := volumeImages(t, s)
	_ = s.Stats()
	require.NoError(t, s.WaitIdle(ctx))

	o, s1, s2, c := mustOpen(t, s, "origin"), mustOpen(t, s, "s1"), mustOpen(t, s, "s2"), mustOpen(t, s, "c")
	var diff []Extent
	for x, err := range s.Diff(s1, s2) {
		require.NoError(t, err)
		diff = append(diff, x)
	}
	require.NotEmpty(t, diff)
	var stream bytes.Buffer
	_, err = s.ExportDiff(ctx, &stream, s1, s2, ExportOptions{})
	require.NoError(t, err)

	for name, err := range map[string]error{
		"origin write":    second(o.WriteAt(make([]byte, 4096), 0)),
		"origin discard":  o.Discard(0, 4096),
		"clone write":     second(c.WriteAt(make([]byte, 4096), 0)),
		"clone discard":   c.Discard(0, 4096),
		"snapshot":        second(s.CreateSnapshot("new", o)),
		"clone of snap":   second(s.CreateClone("new", s1)),
		"clone of origin": second(s.CreateClone("new", o)),
		"rename":          s.Rename("s1", "renamed"),
		"delete":          second(s.Delete("s2")),
		"rollback":        s.Rollback(ctx, o, s1),
		"checkpoint":      s.Checkpoint(ctx),
	} {
		require.ErrorIs(t, err, ErrReadOnly, name)
	}
	require.NoError(t, o.Flush())
	require.NoError(t, c.Flush())
	require.NoError(t, s.Close())
	require.Equal(t, before[0], blockdevtest.ReadAll(t, origin), "origin device changed")
	require.Equal(t, before[1], blockdevtest.ReadAll(t, store), "store device changed")

	rw, err := Open(origin, store, Options{})
	require.NoError(t, err)
	defer rw.Close()
	require.NoError(t, rw.Check())
	require.Equal(t, images, volumeImages(t, rw))
}

// CheckReport lists every problem, not just the first: a store whose
// index has entries of a branch that does not exist reports each of them,
// and Check's error wraps ErrCorrupt and carries the whole list.
func TestCheckReportsEveryProblem(t *testing.T) {
	s, _, _ := newMemStore(t, 4<<20, 16<<20, Options{ChunkSize: 16 << 10})
	require.True(t, s.CheckReport().OK())
	s.mu.Lock()
	for c := range uint64(30) {
		_, err := s.ix.put(entry{b: 77, c: c, e: 1, loc: locZero})
		require.NoError(t, err)
	}
	s.mu.Unlock()
	rep := s.CheckReport()
	require.GreaterOrEqual(t, len(rep.Problems), 30, "%v", rep.Problems)
	for c := range 30 {
		require.Contains(t, rep.Problems, fmt.Sprintf("entry (77,%d,1) of missing branch", c))
	}
	err := s.Check()
	require.ErrorIs(t, err, ErrCorrupt)
	var ce *blockdev.CheckError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, rep.Problems, ce.Problems)
	// Undo, so that the cleanup's Close sees a sane store.
	s.mu.Lock()
	for c := range uint64(30) {
		_, _, err := s.ix.del(77, c, 1)
		require.NoError(t, err)
	}
	s.mu.Unlock()
	require.NoError(t, s.Check())
}

func mustOpen(t *testing.T, s *Store, name string) *Volume {
	t.Helper()
	v, err := s.OpenVolume(name)
	require.NoError(t, err)
	return v
}

// fillAt writes n bytes of value b at off.
func fillAt(t *testing.T, v *Volume, b byte, off, n int64) {
	t.Helper()
	_, err := v.WriteAt(bytes.Repeat([]byte{b}, int(n)), off)
	require.NoError(t, err)
}

func second[T any](_ T, err error) error { return err }
