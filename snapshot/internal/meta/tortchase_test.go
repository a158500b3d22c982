package meta

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestQueriesUnderEvictionAndCommits is a suspect of issue 13's
// unexplained "diff ... misses chunk" (the snapshot store's tiny-cache
// torture), taken alone: the queries the store's copy-on-write and Diff
// rely on (Prev for a chunk's newest epoch, Seek, Get, NextEpoch and
// AscendEpoch) against a model, with a one-page cache (every lookup
// evicts and re-reads), tree commits running all the time on another
// goroutine (as the store's committer does), and views taken at a commit
// and read while later commits free and reuse pages. The keys look like
// the store's: a few branches, a few hundred chunks, many epochs, and the
// live epoch.
func TestQueriesUnderEvictionAndCommits(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 13))
	dev, err := blockdev.NewMem(16384*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: PageSize})
	require.NoError(t, err)
	space := keySpace{branches: 3, chunks: 400, epochs: 40}
	w := &workload{t: t, rng: rng, m: m, md: newModel(), space: space}

	// The committer: commits back to back until stopped.
	var stop atomic.Bool
	var commits atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if err := m.Commit(); err != nil {
				errc <- err
				return
			}
			commits.Add(1)
			runtime.Gosched()
		}
	}()
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()

	// Views taken right after a commit of the writer's, with the model as
	// it was then (the committer commits nothing new in between: only
	// this goroutine changes the tree).
	type heldView struct {
		v  *View
		md *model
	}
	var views []heldView
	defer func() {
		for _, hv := range views {
			hv.v.Release()
		}
	}()

	// The loop goes on past its budget until the committer has committed
	// at least once beside it: under -short on a loaded machine the
	// scheduler could otherwise run all the steps before the committer's
	// first turn, and the test would check nothing it is about. A
	// committer that failed ends the loop through errc.
	budget := blockdevtest.TortureBudget(t, 800) // steps
	for step := 0; budget.Next() || commits.Load() == 0; step++ {
		if commits.Load() == 0 {
			runtime.Gosched()
		}
		w.step()
		w.drain = len(w.md.keys) > 3000 // keep the tree a few times the cache, no more
		tortchaseCheckQueries(t, seed, step, rng, m, w.md, space)
		switch rng.IntN(100) {
		case 0:
			if len(views) >= 4 { // each view keeps the pages of its tree
				break
			}
			require.NoError(t, m.Commit())
			views = append(views, heldView{m.View(), w.md.clone()})
		case 1, 2:
			if len(views) > 0 {
				i := rng.IntN(len(views))
				hv := views[i]
				if rng.IntN(3) == 0 {
					verifyAll(t, hv.v, hv.md)
				}
				tortchaseCheckQueries(t, seed, step, rng, hv.v, hv.md, space)
				if rng.IntN(2) == 0 {
					hv.v.Release()
					views = append(views[:i], views[i+1:]...)
				}
			}
		case 3:
			verifyAll(t, m, w.md)
		}
		select {
		case err := <-errc:
			t.Fatalf("seed %d step %d: commit: %v", seed, step, err)
		default:
		}
	}
	stop.Store(true)
	wg.Wait()
	verifyAll(t, m, w.md)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	cs := m.CacheStats()
	t.Logf("%d keys, %d commits beside the writer, %d views held at the end; cache %+v", len(w.md.keys), commits.Load(), len(views), cs)
	require.Positive(t, commits.Load(), "no commit ran beside the writer")
	require.Positive(t, cs.Evicted, "the cache never evicted")
}

// tortchaseCheckQueries compares with md the answers the snapshot store
// relies on, at a random chunk of the key space: the newest epoch below
// live (Prev from the live epoch), the first key at or after an epoch
// (Seek), Get, NextEpoch from a random epoch, and AscendEpoch from a
// random chunk (a few chunks of it).
func tortchaseCheckQueries(t *testing.T, seed uint64, step int, rng *rand.Rand, r reads, md *model, space keySpace) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d step %d: %s", seed, step, fmt.Sprintf(format, args...))
	}
	b, c := rng.Uint32N(space.branches), rng.Uint64N(space.chunks)
	if len(md.keys) > 0 && rng.IntN(2) == 0 {
		k := md.keys[rng.IntN(len(md.keys))]
		b, c = k.B, k.C
	}
	for _, q := range []Key{{B: b, C: c, E: 0xffffffff}, {B: b, C: c, E: 1 + rng.Uint32N(space.epochs)}, {B: b, C: c + 1, E: 0}} {
		got, loc, ok, err := r.Prev(q)
		require.NoError(t, err)
		want, wok := md.prev(q)
		if ok != wok || ok && (got != want || loc != md.locs[want]) {
			fail("Prev %v: %v loc %d %v, want %v loc %d %v", q, got, loc, ok, want, md.locs[want], wok)
		}
		got, loc, ok, err = r.Seek(q)
		require.NoError(t, err)
		want, wok = md.seek(q)
		if ok != wok || ok && (got != want || loc != md.locs[want]) {
			fail("Seek %v: %v loc %d %v, want %v loc %d %v", q, got, loc, ok, want, md.locs[want], wok)
		}
		loc, ok, err = r.Get(q)
		require.NoError(t, err)
		if wl, wok := md.locs[q]; ok != wok || ok && loc != wl {
			fail("Get %v: %d %v, want %d %v", q, loc, ok, wl, wok)
		}
	}
	e := rng.Uint32N(space.epochs + 2)
	wantE, wokE := uint32(0), false
	for _, k := range md.keys {
		if k.B == b && k.E >= e && (!wokE || k.E < wantE) {
			wantE, wokE = k.E, true
		}
	}
	gotE, okE, err := r.NextEpoch(b, e)
	require.NoError(t, err)
	if okE != wokE || okE && gotE != wantE {
		fail("NextEpoch b%d e%d: %d %v, want %d %v", b, e, gotE, okE, wantE, wokE)
	}
	if !wokE {
		return
	}
	// AscendEpoch of (b, wantE) from chunk c: the first up to 8 chunks.
	var want []uint64
	for _, k := range md.keys {
		if k.B == b && k.E == wantE && k.C >= c && len(want) < 8 {
			want = append(want, k.C)
		}
	}
	var got []uint64
	require.NoError(t, r.AscendEpoch(b, wantE, c, func(x uint64) bool {
		got = append(got, x)
		return len(got) < 8
	}))
	if fmt.Sprint(got) != fmt.Sprint(want) {
		fail("AscendEpoch b%d e%d from %d: %v, want %v", b, wantE, c, got, want)
	}
}
