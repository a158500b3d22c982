package snapshot

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestEpochSums compares the Fenwick tree with a plain array, across
// growth and the values/rebuild round trip.
func TestEpochSums(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 13))
	var f epochSums
	plain := make([]int64, 2000)
	for range 5000 {
		e := uint32(1 + rng.IntN(len(plain)-1))
		v := rng.Int64N(2001) - 1000
		f.add(e, v)
		plain[e] += v
		q := uint32(rng.IntN(len(plain) + 10))
		var want int64
		for i := 1; i <= int(q) && i < len(plain); i++ {
			want += plain[i]
		}
		require.Equal(t, want, f.sum(q), "seed %d: sum(%d)", seed, q)
	}
	vals := f.values()
	for i := 1; i < len(plain); i++ {
		require.Equal(t, plain[i], vals[i], "seed %d: value %d", seed, i)
	}
	f.add(0, 7) // epoch 0 holds nothing
	g := f.clone()
	require.Equal(t, f.sum(5), g.sum(5))
}

// ctrflakeStatPair returns name's Stat from the counters (ok false: they
// cannot answer, and Stat would walk) and the walk's, both of one state:
// the counters are read under Store.mu at the moment the walk takes its
// view. Two separate reads may differ with nothing wrong: the collector,
// dropping a deleted clone's branch in between, releases its hold on its
// parent point, and the bytes that hold shared become exclusive.
func ctrflakeStatPair(s *Store, name string) (got VolumeStat, ok bool, want VolumeStat, err error) {
	var gerr error
	want, err = s.statWalkAt(name, func(v *volume) {
		got, ok, gerr = s.countedStatLocked(v)
	})
	return got, ok, want, errors.Join(err, gerr)
}

// requireStatsMatchWalk compares Stat of every visible volume with the
// walk it replaced (the oracle), both of one state, and the origin's with
// a pass over its preserved epochs.
func requireStatsMatchWalk(t testing.TB, s *Store, why string) {
	t.Helper()
	for _, v := range s.List() {
		if v.Kind == KindOrigin {
			var shared int64
			s.mu.RLock()
			got := s.originStatLocked(s.volumes[v.ID])
			need := s.b0.need.Load()
			for c := uint64(0); c < s.chunks; c++ {
				pe, err := s.preservedOf(c)
				require.NoError(t, err)
				if need > pe {
					shared += s.chunkLen(c)
				}
			}
			s.mu.RUnlock()
			require.Equal(t, s.geo.originSize, got.Mapped, why)
			require.Equal(t, shared, got.Shared, "%s: origin", why)
			require.Equal(t, got.Mapped-shared, got.Exclusive, "%s: origin", why)
			continue
		}
		got, ok, want, err := ctrflakeStatPair(s, v.Name)
		require.NoError(t, err, why)
		if !ok { // Stat walks for this volume: its answer is the walk's
			continue
		}
		require.Equal(t, want, got, "%s: volume %s", why, v.Name)
	}
}

// chunkWriter returns a function that writes whole 4 KiB chunks of v, then
// flushes it.
func chunkWriter(t *testing.T, v *Volume) func(chunks ...int) {
	buf := make([]byte, 4096)
	return func(chunks ...int) {
		for _, c := range chunks {
			_, err := v.WriteAt(buf, int64(c)*4096)
			require.NoError(t, err)
		}
		require.NoError(t, v.Flush())
	}
}

// TestCountersNeighbours deletes snapshots between others, so that the
// bytes two snapshots shared become one's alone, and compares Stat with
// the walk at each step; then reopens (the counters come from the
// checkpoint) and compares again.
func TestCountersNeighbours(t *testing.T) {
	origin, _ := blockdev.NewMem(64*4096, 512)
	store, _ := blockdev.NewMem(8<<20, 512)
	opts := Options{ChunkSize: 4096, JournalSize: 256 << 10}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	o := s.Origin()
	write := chunkWriter(t, o)
	// Copies after s1: chunks 0-3; after s2: 0, 1, 4; after s3: 2, 4;
	// after s4: 0.
	for i, w := range [][]int{{0, 1, 2, 3}, {0, 1, 4}, {2, 4}, {0}} {
		_, err := s.CreateSnapshot(fmt.Sprintf("s%d", i+1), o)
		require.NoError(t, err)
		write(w...)
	}
	requireStatsMatchWalk(t, s, "before deletes")
	st, err := s.Stat("s2")
	require.NoError(t, err)
	// s2 reads the copies of 0 and 1 made after it (its alone), of 2 made
	// after s3 (s3's too) and of 4 made after it (s1's too); chunk 3
	// it reads from the origin.
	require.EqualValues(t, 4*4096, st.Mapped)
	require.EqualValues(t, 2*4096, st.Exclusive)
	for _, name := range []string{"s2", "s3"} {
		d, err := s.Delete(name)
		require.NoError(t, err)
		requireStatsMatchWalk(t, s, "after delete of "+name)
		require.NoError(t, d.Wait(context.Background()))
		requireStatsMatchWalk(t, s, "after collection of "+name)
		require.NoError(t, s.Check())
	}
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	requireStatsMatchWalk(t, s, "after reopen")
	require.NoError(t, s.Check())
}

// TestCountersWorkload runs the random model workload with Stat compared
// with the walk every few steps.
func TestCountersWorkload(t *testing.T) {
	seed := blockdevtest.Seed(t)
	origin, _ := blockdev.NewMem(128<<10, 512)
	store, _ := blockdev.NewMem(8<<20, 512)
	fillPattern(t, origin, seed)
	w := newWorkload(t, seed, origin, store, Options{ChunkSize: 4 << 10, JournalSize: 256 << 10})
	defer func() { _ = w.s.Close() }()
	for i := range shortScale(1200) {
		require.NoError(t, w.step())
		if i%10 == 0 {
			requireStatsMatchWalk(t, w.s, fmt.Sprintf("seed %d step %d", seed, w.steps))
		}
	}
	require.NoError(t, w.s.WaitIdle(context.Background()))
	requireStatsMatchWalk(t, w.s, fmt.Sprintf("seed %d end", seed))
	mustCheck(t, w.s)
}

// TestCheckReportsCounters corrupts each kind of counter and sees Check
// report it; a store whose counters were not kept is reported too.
func TestCheckReportsCounters(t *testing.T) {
	origin, _ := blockdev.NewMem(64*4096, 512)
	store, _ := blockdev.NewMem(8<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 4096, JournalSize: 256 << 10})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	snap, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	_, err = o.WriteAt(make([]byte, 3*4096), 0)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	require.NoError(t, s.Check())
	e := snap.meta.epoch
	for _, tc := range []struct {
		name, want string
		corrupt    func()
		undo       func()
	}{
		{"mapped", "mapped counter", func() { s.ctr.mapped.add(e, 512) }, func() { s.ctr.mapped.add(e, -512) }},
		{"exclusive", "exclusive counter", func() { s.ctr.addExcl(e, -4096) }, func() { s.ctr.addExcl(e, 4096) }},
		{"unheld", "nothing holds", func() { s.ctr.addExcl(e+5, 4096) }, func() { s.ctr.addExcl(e+5, -4096) }},
		{"stale", "not maintained", func() { s.ctr.stale = true }, func() { s.ctr.stale = false }},
		{"origin", "origin: ", func() { s.ctr.pres.add(1, 4096) }, func() { s.ctr.pres.add(1, -4096) }},
	} {
		s.mu.Lock()
		tc.corrupt()
		s.mu.Unlock()
		err := s.Check()
		require.ErrorIs(t, err, ErrCorrupt, tc.name)
		require.ErrorContains(t, err, tc.want, tc.name)
		s.mu.Lock()
		tc.undo()
		s.mu.Unlock()
		require.NoError(t, s.Check(), tc.name)
	}
}

// TestCountersRebuiltFromOldImage: an image without counters (version 2)
// leaves them stale, and Open rebuilds them by a walk.
func TestCountersRebuiltFromOldImage(t *testing.T) {
	origin, _ := blockdev.NewMem(64*4096, 512)
	store, _ := blockdev.NewMem(8<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 4096, JournalSize: 256 << 10})
	require.NoError(t, err)
	o := s.Origin()
	_, err = s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	_, err = o.WriteAt(make([]byte, 2*4096), 4096)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	want, err := s.Stat("s1")
	require.NoError(t, err)
	s.mu.Lock()
	s.ctr.stale = true // the next checkpoint has no counters
	s.mu.Unlock()
	require.NoError(t, s.Close())
	s, err = Open(origin, store, Options{})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	require.True(t, s.ctrRebuilt)
	got, err := s.Stat("s1")
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.False(t, s.ctr.stale)
	require.NoError(t, s.Check())
}

// TestCountersConcurrent takes, stats and deletes snapshots of the origin
// while a writer copies chunks, then compares every Stat with the walk
// (run with -race: the counters are read under the shared lock while the
// apply path changes them).
func TestCountersConcurrent(t *testing.T) {
	seed := blockdevtest.Seed(t)
	origin, _ := blockdev.NewMem(256*4096, 512)
	store, _ := blockdev.NewMem(16<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 4096, JournalSize: 512 << 10})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	stop := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 4096)
		for {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			if _, err := o.WriteAt(buf, rng.Int64N(256)*4096); err != nil {
				werr <- err
				return
			}
		}
	}()
	rng := rand.New(rand.NewPCG(seed, 2))
	var live []string
	for i := range 40 {
		name := fmt.Sprintf("s%d", i)
		_, err := s.CreateSnapshot(name, o)
		require.NoError(t, err)
		live = append(live, name)
		_, err = s.Stat(live[rng.IntN(len(live))])
		require.NoError(t, err)
		if len(live) > 4 && rng.IntN(3) == 0 {
			j := rng.IntN(len(live))
			_, err := s.Delete(live[j])
			require.NoError(t, err)
			live = append(live[:j], live[j+1:]...)
		}
	}
	close(stop)
	require.NoError(t, <-werr)
	require.NoError(t, s.WaitIdle(context.Background()))
	requireStatsMatchWalk(t, s, fmt.Sprintf("seed %d", seed))
	require.NoError(t, s.Check())
}

// smallCrashStore formats a store of 4 KiB chunks on power-cut simulators:
// a 64-chunk origin and an 8 MiB store, committed by hand.
func smallCrashStore(t *testing.T) (s *Store, oSim, sSim *blockdevtest.CrashSim, opts Options) {
	oSim = blockdevtest.MustCrashSim(64*4096, 512)
	sSim = blockdevtest.MustCrashSim(8<<20, 512)
	opts = Options{ChunkSize: 4096, JournalSize: 256 << 10, CommitInterval: -1}
	s, err := Format(oSim, sSim, opts)
	require.NoError(t, err)
	return s, oSim, sSim, opts
}

// TestCountersCrashBetweenTreeAndCheckpoint cuts the power after a tree
// commit is durable but before its journal checkpoint is written. Open
// then loads counters older than the tree and replays the records between
// for their small state only: the counters must be rebuilt, not trusted.
func TestCountersCrashBetweenTreeAndCheckpoint(t *testing.T) {
	s, oSim, sSim, opts := smallCrashStore(t)
	var err error
	o := s.Origin()
	write := chunkWriter(t, o)
	_, err = s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	write(0, 1, 2)
	require.NoError(t, s.Checkpoint(context.Background())) // tree and journal checkpoint agree
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	write(0, 3)
	crashAfterTreeCommit(t, s) // a tree commit whose journal checkpoint is never written
	write(1, 4)                // records after the tree commit: replayed whole
	want := map[string]VolumeStat{}
	for _, name := range []string{"s1", "s2"} {
		want[name], err = s.Stat(name)
		require.NoError(t, err)
	}
	o2, s2 := oSim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop}), sSim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	_ = s.Close() // the devices are gone: this only stops the goroutines
	s, err = Open(o2, s2, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	require.True(t, s.ctrRebuilt, "the crash did not fall between the two commits")
	requireStatsMatchWalk(t, s, "after the crash")
	for name, w := range want {
		got, err := s.Stat(name)
		require.NoError(t, err)
		require.Equal(t, w, got, name)
	}
	require.NoError(t, s.Check())
}

// TestCountersDeletedCloneHold holds the collector between a clone's
// Delete and the drop of its branch: until the drop, the branch still
// holds its parent point, so the parent snapshot's bytes are shared; after
// it they are the snapshot's alone. A Stat taken before the collection and
// a walk taken after it therefore differ with both right, which is what
// made TestCountersWorkload fail now and then when it read the two
// separately; ctrflakeStatPair reads both of one state.
func TestCountersDeletedCloneHold(t *testing.T) {
	origin, _ := blockdev.NewMem(64*4096, 512)
	store, _ := blockdev.NewMem(8<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 4096, JournalSize: 256 << 10})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	chunkWriter(t, o)(0, 1, 2, 3) // four copies that s1 reads
	c1, err := s.CreateClone("c1", s1)
	require.NoError(t, err)
	chunkWriter(t, c1)(10) // an entry of c1's own for the collector to take
	requireStatsMatchWalk(t, s, "with the clone")

	// The collector takes a stripe lock for each batch of c1's entries,
	// so holding them all keeps c1's branch (and its hold) in place.
	for i := range s.cloneLocks {
		s.cloneLocks[i].Lock()
	}
	d, err := s.Delete("c1")
	require.NoError(t, err)
	before, err := s.Stat("s1")
	require.NoError(t, err)
	require.Zero(t, before.Exclusive, "the deleted clone's branch still holds s1")
	requireStatsMatchWalk(t, s, "clone deleted, branch not yet dropped")
	for i := range s.cloneLocks {
		s.cloneLocks[i].Unlock()
	}
	require.NoError(t, d.Wait(context.Background()))

	after, err := s.statWalk("s1")
	require.NoError(t, err)
	require.EqualValues(t, 4*4096, after.Exclusive, "the drop released the hold")
	require.NotEqual(t, before, after, "a Stat before the collection and a walk after it differ")
	requireStatsMatchWalk(t, s, "after the collection")
	require.NoError(t, s.Check())
}
