package snapshot

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// diffstallStore formats a store and copies about half of its origin's
// chunks after a snapshot, in random order, so that the preserved-epoch
// cache holds their epochs.
func diffstallStore(t *testing.T, rng *rand.Rand) (*Store, *Volume) {
	t.Helper()
	const cs = 4 << 10
	const chunks = 4096
	s, _, _ := newMemStore(t, chunks*cs, 64<<20, Options{ChunkSize: cs, JournalSize: 1 << 20})
	o := s.Origin()
	_, err := s.CreateSnapshot("a", o)
	require.NoError(t, err)
	buf := make([]byte, cs)
	for _, c := range rng.Perm(chunks)[:chunks/2] {
		buf[0] = byte(c)
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	return s, o
}

// TestDiffstallCheckSharesPreservedEpochs: Check's copy of the
// preserved-epoch cache, taken under Store.mu, shares the cache's arrays
// instead of copying them (6.5 MB, milliseconds under the lock, at the
// default MetadataCache), and a change after it copies the changed table
// first: the live cache takes the change, the copy keeps the epoch of
// its instant. The old code copied every table under the lock: the
// first check fails there.
func TestDiffstallCheckSharesPreservedEpochs(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 15))
	s, o := diffstallStore(t, rng)
	s.mu.Lock()
	cs := s.checkStateLocked()
	s.mu.Unlock()
	shared, tables := 0, 0
	var c uint64
	var was uint32
	for i := range s.pres.t {
		live, cp := &s.pres.t[i], &cs.pres.t[i]
		if len(live.keys) == 0 {
			continue
		}
		tables++
		if &live.keys[0] == &cp.keys[0] && &live.vals[0] == &cp.vals[0] {
			shared++
		}
		for j, k := range live.keys {
			if k != 0 && was == 0 {
				c, was = (k-1)*nStripes+uint64(i), live.vals[j]
			}
		}
	}
	require.Positive(t, tables, "the cache holds no epoch: the test proves nothing")
	require.Equal(t, tables, shared, "tables copied under Store.mu")
	require.NotZero(t, was)

	// A new snapshot, and a copy-on-write of chunk c at its epoch.
	_, err := s.CreateSnapshot("b", o)
	require.NoError(t, err)
	_, err = o.WriteAt(make([]byte, 4096), int64(c)*s.cs)
	require.NoError(t, err)
	now, ok := s.pres.known(c)
	require.True(t, ok)
	require.Greater(t, now, was, "the write raised no epoch: the test proves nothing")
	got, ok := cs.pres.known(c)
	require.True(t, ok)
	require.Equal(t, was, got, "a change after the copy reached Check's copy")
	require.NoError(t, s.Check())
}

// TestDiffstallCheckVolumesOnCopies: Check compares the volume, name and
// point tables on copies taken under Store.mu (volTablesLocked,
// checkStateLocked), so the comparisons, a few map lookups per volume,
// run after the lock is released: whatever changes the store's tables
// meanwhile, the copies stay those of their instant. A copy with a name
// missing is reported.
func TestDiffstallCheckVolumesOnCopies(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 16))
	s, o := diffstallStore(t, rng)
	for _, name := range []string{"b", "c", "d"} {
		_, err := s.CreateSnapshot(name, o)
		require.NoError(t, err)
	}
	s.mu.Lock()
	cs := s.checkStateLocked()
	tabs := s.volTablesLocked(nil)
	s.mu.Unlock()

	// The tables change after the copy.
	_, err := s.CreateSnapshot("e", o)
	require.NoError(t, err)
	op, err := s.Delete("b")
	require.NoError(t, err)
	require.NoError(t, op.Wait(t.Context()))
	require.NoError(t, s.Rename("c", "c2"))

	var found []string
	bad := func(format string, args ...any) bool {
		found = append(found, format)
		return true
	}
	checkVolumes(tabs, &cs, bad)
	require.Empty(t, found, "the copies do not agree with each other")
	require.NoError(t, s.Check())

	delete(tabs.byName, "d")
	checkVolumes(tabs, &cs, bad)
	require.Equal(t, []string{"volume %d (%q) missing from the name table"}, found)
}

// TestDiffstallCaptureReusesVolumeRecords: a tree commit's capture, made
// under Store.mu, reuses the last capture's volume records while no
// record changed a volume, instead of walking and sorting every volume
// again (milliseconds with 10,000 snapshots, at every tree commit, which
// the writer waited for). A snapshot, a rename and a delete each make the
// next capture's records anew, equal to a fresh walk's. The old code made
// them at every capture: the first check fails there.
func TestDiffstallCaptureReusesVolumeRecords(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 17))
	s, o := diffstallStore(t, rng)
	capture := func() []volRec {
		s.mu.Lock()
		defer s.mu.Unlock()
		var c capture
		s.smallStateLocked(&c)
		require.Equal(t, s.makeVolRecs(), c.volumes, "the capture's records are not the volumes'")
		return c.volumes
	}
	first := capture()
	require.NotEmpty(t, first)
	again := capture()
	require.Same(t, &first[0], &again[0], "a capture with no volume changed made its records again")

	for i, change := range []func() error{
		func() error { _, err := s.CreateSnapshot("b", o); return err },
		func() error { return s.Rename("b", "b2") },
		func() error {
			op, err := s.Delete("a")
			if err == nil {
				err = op.Wait(t.Context())
			}
			return err
		},
	} {
		require.NoError(t, change())
		recs := capture() // equal to a fresh walk's (in capture)
		require.NotSame(t, &first[0], &recs[0], "change %d: the capture kept the old records", i)
		first = recs
	}
	require.NoError(t, s.Check())
}
