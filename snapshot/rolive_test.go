package snapshot

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// roliveSlices returns a view of all of dev that takes no lock (a Slice),
// as a second user of a device without flock would have.
func roliveSlices(t *testing.T, dev blockdev.Device) blockdev.Device {
	t.Helper()
	s, err := blockdev.Slice(dev, 0, dev.Size())
	require.NoError(t, err)
	return s
}

// roliveChurn is one round of a writer: origin writes to random chunks, a
// snapshot, the delete of the one three rounds back, and a tree commit.
func roliveChurn(t *testing.T, s *Store, rng *rand.Rand, round int) {
	t.Helper()
	o := s.Origin()
	buf := make([]byte, s.cs)
	for range 200 {
		buf[0] = byte(rng.Uint32())
		_, err := o.WriteAt(buf, rng.Int64N(o.Size()/s.cs)*s.cs)
		require.NoError(t, err)
	}
	_, err := s.CreateSnapshot(fmt.Sprintf("w%d", round), o)
	require.NoError(t, err)
	if round >= 3 {
		d, err := s.Delete(fmt.Sprintf("w%d", round-3))
		require.NoError(t, err)
		require.NoError(t, d.Wait(context.Background()))
	}
	require.NoError(t, s.Checkpoint(context.Background()))
}

// roliveRequireChanged checks that err is nil or the typed "store changed"
// outcome, never corruption; it reports whether it was the latter.
func roliveRequireChanged(t *testing.T, err error, what string) bool {
	t.Helper()
	if err == nil {
		return false
	}
	require.ErrorIs(t, err, ErrStoreChanged, "%s", what)
	require.NotErrorIs(t, err, ErrCorrupt, "%s", what)
	require.Contains(t, err.Error(), "the store changed under the read-only open (transaction ")
	require.Contains(t, err.Error(), "reopen it")
	return true
}

// A read-only Open beside a live writer, on devices that take no lock
// (Slices of one Mem, or of one File): while the writer does tree commits
// and reuses the pages the read-only store's view reached, Check and
// volume reads through the read-only store return nil or a
// *StoreChangedError, never ErrCorrupt (before, Check reported false
// corruption from the writer's second tree commit on). Once it has said
// so, the store stays failed with that error; a reopen reads the new
// state and checks clean.
func TestRoliveReadOnlyBesideWriter(t *testing.T) {
	for _, dev := range []string{"mem", "file"} {
		t.Run(dev, func(t *testing.T) {
			seed := blockdevtest.Seed(t)
			rng := rand.New(rand.NewPCG(seed, 19))
			origin, err := blockdev.NewMem(8<<20, 4096)
			require.NoError(t, err)
			var store blockdev.Device
			if dev == "mem" {
				store, err = blockdev.NewMem(32<<20, 4096)
			} else {
				var f *blockdev.File
				f, err = blockdev.Create(filepath.Join(t.TempDir(), "store"), 32<<20, blockdev.FileOptions{})
				if err == nil {
					t.Cleanup(func() { _ = f.Close() })
				}
				store = f
			}
			require.NoError(t, err)
			opts := Options{ChunkSize: 4096, CommitInterval: -1}
			w, err := Format(roliveSlices(t, origin), roliveSlices(t, store), opts)
			require.NoError(t, err)
			defer func() { _ = w.Close() }()
			for round := range 3 {
				roliveChurn(t, w, rng, round)
			}
			require.NoError(t, w.Checkpoint(context.Background()))

			roOpts := Options{ReadOnly: true, MetadataCache: 16 << 10} // re-reads pages
			ro, err := Open(roliveSlices(t, origin), roliveSlices(t, store), roOpts)
			require.NoError(t, err)
			require.NoError(t, ro.Check(), "nothing changed yet")
			snap := mustOpen(t, ro, "w2")
			require.NotEmpty(t, blockdevtest.ReadAll(t, snap))
			// Origin writes (copies-on-write, the fingerprint's samples
			// among them) but no tree commit: nothing the read-only view
			// reaches is reused, and the samples the writer changed are
			// not "changed outside the store".
			o := w.Origin()
			for i := range int64(64) {
				fillAt(t, o, byte(i), i*(o.Size()/64), w.cs)
			}
			require.NoError(t, o.Flush())
			require.NoError(t, ro.Check(), "origin writes without a tree commit")
			// (A read of snap now may return the origin's new bytes where
			// the writer copied the old ones out since the Open: data is
			// read as it is, livero.go says so.)

			changed := false
			buf := make([]byte, 64<<10)
			for round := 3; round < 40 && !changed; round++ {
				roliveChurn(t, w, rng, round)
				for off := int64(0); off < snap.Size() && !changed; off += int64(len(buf)) {
					_, err := snap.ReadAt(buf, off)
					changed = roliveRequireChanged(t, err, "snapshot read")
				}
				if !changed {
					changed = roliveRequireChanged(t, ro.Check(), "check")
				}
			}
			require.True(t, changed, "40 rounds of tree commits reused no page the read-only view reached")
			// Failed with it from then on; the report says it in one line.
			require.ErrorIs(t, second(snap.ReadAt(buf, 0)), ErrStoreChanged)
			rep := ro.CheckReport()
			require.Len(t, rep.Problems, 1, "%v", rep.Problems)
			require.Contains(t, rep.Problems[0], "the store changed under the read-only open")
			require.NoError(t, ro.Close())

			ro, err = Open(roliveSlices(t, origin), roliveSlices(t, store), roOpts)
			require.NoError(t, err)
			require.NoError(t, ro.Check())
			require.NoError(t, ro.Close())
			require.NoError(t, w.Check())
		})
	}
}

// A read-only Open of a File store device that a writer holds (its flock,
// through another handle) is refused, typed: ErrLocked, ErrLiveWriter and
// the device's *blockdev.LockedError, with a message that says how to
// check a live store. Once the writer closes, it opens and checks clean.
func TestRoliveReadOnlyRefusedByWriterLock(t *testing.T) {
	dir := t.TempDir()
	origin, err := blockdev.Create(filepath.Join(dir, "origin"), 4<<20, blockdev.FileOptions{})
	require.NoError(t, err)
	defer func() { _ = origin.Close() }()
	store, err := blockdev.Create(filepath.Join(dir, "store"), 16<<20, blockdev.FileOptions{})
	require.NoError(t, err)
	defer func() { _ = store.Close() }()
	w, err := Format(origin, store, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	require.NoError(t, err)
	fillAt(t, w.Origin(), 7, 0, 64<<10)
	require.NoError(t, w.Checkpoint(context.Background()))

	origin2, err := blockdev.Open(filepath.Join(dir, "origin"), blockdev.FileOptions{})
	require.NoError(t, err)
	defer func() { _ = origin2.Close() }()
	store2, err := blockdev.Open(filepath.Join(dir, "store"), blockdev.FileOptions{})
	require.NoError(t, err)
	defer func() { _ = store2.Close() }()
	_, err = Open(origin2, store2, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrLocked)
	require.ErrorIs(t, err, ErrLiveWriter)
	var le *blockdev.LockedError
	require.ErrorAs(t, err, &le)
	require.Contains(t, err.Error(), "blocksnap check")
	require.NoError(t, w.Check(), "the live store checks through its writer")

	require.NoError(t, w.Close())
	ro, err := Open(origin2, store2, Options{ReadOnly: true})
	require.NoError(t, err)
	require.NoError(t, ro.Check())
	require.NoError(t, ro.Close())
}

// Check of a live store races origin writes, snapshots and deletes (the
// collector running), with a metadata cache of a few pages so that both
// the writers and Check's walk of its committed view read pages from the
// device: every Check is clean, every write and admin call succeeds, and
// the store checks clean after a reopen. Run it with -race: Check reads a
// view and copies of the small state, never the live index unlocked.
func TestRoliveCheckRacesWriters(t *testing.T) {
	seed := blockdevtest.Seed(t)
	opts := Options{ChunkSize: 4096, MetadataCache: 32 << 10, CommitInterval: 5 * time.Millisecond}
	s, origin, store := newMemStore(t, 4<<20, 32<<20, opts)
	o := s.Origin()
	rounds := 12
	if testing.Short() {
		rounds = 6
	}
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	g, ctx := errgroup.WithContext(parent) // a failed writer ends the checks' waits
	var writes atomic.Int64
	g.Go(func() error { // origin writes until the checks are done
		rng := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 4096)
		for ctx.Err() == nil {
			buf[0] = byte(rng.Uint32())
			if _, err := o.WriteAt(buf, rng.Int64N(o.Size()/4096)*4096); err != nil {
				return fmt.Errorf("origin write: %w", err)
			}
			writes.Add(1)
		}
		return nil
	})
	g.Go(func() error { // snapshots, each deleted two later
		for i := 0; ctx.Err() == nil; i++ {
			if _, err := s.CreateSnapshot(fmt.Sprintf("r%d", i), o); err != nil {
				return fmt.Errorf("snapshot: %w", err)
			}
			if i >= 2 {
				if _, err := s.Delete(fmt.Sprintf("r%d", i-2)); err != nil {
					return fmt.Errorf("delete: %w", err)
				}
			}
		}
		return nil
	})
	var checkErr error
	for i := 0; i < rounds && checkErr == nil; i++ {
		// Each check after some writes, so that each sees a new commit.
		for at := writes.Load(); writes.Load() < at+50 && ctx.Err() == nil; {
			runtime.Gosched()
		}
		checkErr = s.Check()
	}
	cancel()
	require.NoError(t, g.Wait())
	require.NoError(t, checkErr)
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
	s, err := Open(origin, store, opts)
	require.NoError(t, err)
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
}
