package meta

import (
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// each calls fn for every entry of nt. Under cache.mu (either way).
func (nt *nodeTable) each(fn func(*node)) {
	t := nt.cur.Load()
	if t == nil {
		return
	}
	for i := range t.slots {
		if n := t.slots[i].Load(); n != nil && n != tombstone {
			fn(n)
		}
	}
}

// TestNodeTableModel: random inserts and deletes against a map, dense and
// sparse page numbers, through growth and tombstone sweeps.
func TestNodeTableModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 1))
	var nt nodeTable
	model := map[uint64]*node{}
	require.Nil(t, nt.get(7), "an empty table")
	nt.del(7)
	for i := range 40_000 {
		loc := rng.Uint64N(3000) // dense: the cache's pages
		if i%3 == 0 {
			loc = rng.Uint64() // sparse
		}
		switch {
		case model[loc] != nil && rng.IntN(2) == 0:
			nt.del(loc)
			delete(model, loc)
		case model[loc] == nil:
			n := &node{loc: loc}
			nt.put(n)
			model[loc] = n
		}
		if i%997 == 0 {
			require.Equal(t, len(model), nt.len())
			for l, n := range model {
				require.Same(t, n, nt.get(l), "loc %d", l)
			}
			seen := 0
			nt.each(func(n *node) {
				require.Same(t, model[n.loc], n)
				seen++
			})
			require.Equal(t, len(model), seen)
			tab := nt.cur.Load()
			require.LessOrEqual(t, nt.used*4, len(tab.slots)*3, "a probe always reaches an empty slot")
		}
		require.Nil(t, nt.get(loc+1<<62), "a page not in the table")
	}
}

// TestNodeTableLookupsWithoutLock: lookups with no lock while a writer
// inserts, deletes and rebuilds; each finds either nothing or the node
// of its own page, and a page never deleted is always found. Run it with
// -race: the lookups share no lock with the writer.
func TestNodeTableLookupsWithoutLock(t *testing.T) {
	seed := blockdevtest.Seed(t)
	var nt nodeTable
	var mu sync.Mutex // the writer's cache.mu
	const stable = 100
	for loc := range uint64(stable) {
		nt.put(&node{loc: loc})
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(r)+10))
			for !stop.Load() {
				loc := rng.Uint64N(5000)
				n := nt.get(loc)
				switch {
				case n != nil && n.loc != loc:
					errs <- "a lookup found another page's node"
					return
				case n == nil && loc < stable:
					errs <- "a lookup missed a page never deleted"
					return
				}
			}
		}()
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	live := map[uint64]bool{}
	for range 60_000 {
		loc := stable + rng.Uint64N(4900)
		mu.Lock()
		if live[loc] {
			nt.del(loc)
			delete(live, loc)
		} else {
			nt.put(&node{loc: loc})
			live[loc] = true
		}
		mu.Unlock()
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	require.Equal(t, stable+len(live), nt.len())
}

// TestStripedCounterSums: adds on every stripe are all counted.
func TestStripedCounterSums(t *testing.T) {
	var c stripedCounter
	for k := range uint64(1000) {
		c.add(k*7, 1)
	}
	require.Equal(t, uint64(1000), c.load())
}

// TestLead9SharedReaderCountsHits: the hits a shared reader counts itself
// reach the cache's count when the reader is put back, as a view's do at
// once.
func TestLead9SharedReaderCountsHits(t *testing.T) {
	dev, err := blockdev.NewMem(1<<12*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 20})
	require.NoError(t, err)
	defer m.Close()
	for i := range uint64(5000) {
		require.NoError(t, m.Put(Key{C: i * 3, E: 1}, i))
	}
	h0 := m.cache.stats().Hits
	for i := range uint64(10) {
		loc, ok, err := m.GetNoRead(Key{C: i * 3, E: 1})
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, i, loc)
	}
	h1 := m.cache.stats().Hits
	require.GreaterOrEqual(t, h1-h0, uint64(20), "ten lookups of a two-level tree")
	require.NoError(t, m.Commit()) // a view reads the last commit
	h1 = m.cache.stats().Hits
	v := m.View()
	defer v.Release()
	_, _, err = v.Get(Key{C: 3, E: 1})
	require.NoError(t, err)
	require.Greater(t, m.cache.stats().Hits, h1)
}

// TestLead9WritePagesAcrossRegions: a run of consecutive pages that
// crosses from the base region into an extent (GrowFromData), and from
// one extent into the next, is written to each part where locate puts
// its pages, and a page past the region is refused.
func TestLead9WritePagesAcrossRegions(t *testing.T) {
	const base, chunkBytes = 16, 2 * PageSize
	dev, err := blockdev.NewMem(base*PageSize, 4096)
	require.NoError(t, err)
	outer, err := blockdev.NewMem(16*chunkBytes, 4096)
	require.NoError(t, err)
	m := &Meta{dev: dev}
	m.opts.Outer, m.opts.DataOff, m.opts.ChunkBytes = outer, chunkBytes, chunkBytes
	// Pages 16-17 in data chunk 5, 18-21 in chunks 2-3.
	m.layout.Store(&layout{base: base, ext: []extent{{chunk: 5, chunks: 1, start: 16, pages: 2}, {chunk: 2, chunks: 2, start: 18, pages: 4}}})
	p := make([]byte, 8*PageSize)
	for i := range 8 {
		p[i*PageSize] = byte(i + 1)
	}
	require.NoError(t, m.writePages(p[:7*PageSize], 14)) // pages 14-20
	for i := range 7 {
		d, off := m.locate(uint64(14 + i))
		got := make([]byte, PageSize)
		_, err := d.ReadAt(got, off)
		require.NoError(t, err)
		require.Equal(t, p[i*PageSize:(i+1)*PageSize], got, "page %d", 14+i)
	}
	require.Error(t, m.writePages(p[:2*PageSize], 21), "page 22 lies past the region")
}

// TestLead9UpperBoundMatchesSearch: upperBound, which guesses where q
// falls before it searches (narrow), gives a plain binary search's answer
// on nodes of every size around interpolateMin, with chunks spread evenly,
// in runs, bunched, over several branches and epochs, and queries before,
// between, on and after their keys.
func TestLead9UpperBoundMatchesSearch(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 29))
	for trial := range 3000 {
		n := 1 + rng.IntN(3*interpolateMin)
		if trial%10 == 0 {
			n = 100 + rng.IntN(400)
		}
		for _, k := range []kind{chunkTree, epochTree} {
			runs := make([]run, n)
			shape := trial % 4
			for i := range runs {
				r := &runs[i]
				switch shape {
				case 0: // one branch and epoch, chunks anywhere
					r.b, r.e, r.c = 1, 5, rng.Uint64()
				case 1: // consecutive chunks
					r.b, r.e, r.c = 1, 5, uint64(i)*3
				case 2: // few chunks, many epochs
					r.b, r.e, r.c = 1, uint32(rng.IntN(4)), uint64(rng.IntN(5))
				default: // several branches, huge and tiny chunks
					r.b, r.e, r.c = uint32(rng.IntN(3)), uint32(rng.IntN(3)), []uint64{0, 1, ^uint64(0), rng.Uint64()}[rng.IntN(4)]
				}
			}
			slices.SortFunc(runs, func(x, y run) int {
				if atOrBefore(k, &x, &y) && atOrBefore(k, &y, &x) {
					return 0
				}
				if atOrBefore(k, &x, &y) {
					return -1
				}
				return 1
			})
			for range 20 {
				q := runs[rng.IntN(n)]
				switch rng.IntN(4) {
				case 0:
					q.c++
				case 1:
					q.c--
				case 2:
					q = run{b: uint32(rng.IntN(4)), e: uint32(rng.IntN(6)), c: rng.Uint64()}
				}
				want := sort.Search(n, func(i int) bool { return !atOrBefore(k, &runs[i], &q) })
				require.Equal(t, want, upperBound(k, runs, q), "trial %d kind %d n %d q %+v", trial, k, n, q)
			}
		}
	}
}
