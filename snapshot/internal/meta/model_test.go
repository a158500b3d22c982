package meta

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func keyCmp(a, b Key) int {
	if c := cmp.Compare(a.B, b.B); c != 0 {
		return c
	}
	if c := cmp.Compare(a.C, b.C); c != 0 {
		return c
	}
	return cmp.Compare(a.E, b.E)
}

// model is the reference: sorted keys and their locations.
type model struct {
	keys []Key
	locs map[Key]uint64
}

func newModel() *model { return &model{locs: map[Key]uint64{}} }

func (m *model) clone() *model {
	c := &model{keys: slices.Clone(m.keys), locs: make(map[Key]uint64, len(m.locs))}
	for k, v := range m.locs {
		c.locs[k] = v
	}
	return c
}

func (m *model) put(k Key, loc uint64) {
	i, _ := slices.BinarySearchFunc(m.keys, k, keyCmp)
	m.keys = slices.Insert(m.keys, i, k)
	m.locs[k] = loc
}

func (m *model) del(k Key) {
	i, _ := slices.BinarySearchFunc(m.keys, k, keyCmp)
	m.keys = slices.Delete(m.keys, i, i+1)
	delete(m.locs, k)
}

// seek is the first key >= q.
func (m *model) seek(q Key) (Key, bool) {
	i, _ := slices.BinarySearchFunc(m.keys, q, keyCmp)
	if i == len(m.keys) {
		return Key{}, false
	}
	return m.keys[i], true
}

func (m *model) prev(q Key) (Key, bool) {
	i, _ := slices.BinarySearchFunc(m.keys, q, keyCmp)
	if i == 0 {
		return Key{}, false
	}
	return m.keys[i-1], true
}

// reads is what both Meta and View answer.
type reads interface {
	Seek(Key) (Key, uint64, bool, error)
	Prev(Key) (Key, uint64, bool, error)
	Get(Key) (uint64, bool, error)
	Ascend(Key, func(Key, uint64) bool) error
	AscendEpoch(b, e uint32, from uint64, fn func(uint64) bool) error
	NextEpoch(b, e uint32) (uint32, bool, error)
}

// verifyQueries compares random point queries.
func verifyQueries(t *testing.T, rng *rand.Rand, r reads, md *model, n int, space keySpace) {
	t.Helper()
	for range n {
		q := space.random(rng)
		if len(md.keys) > 0 && rng.IntN(2) == 0 {
			q = md.keys[rng.IntN(len(md.keys))]
		}
		got, loc, ok, err := r.Seek(q)
		require.NoError(t, err)
		want, wok := md.seek(q)
		require.Equal(t, wok, ok, "seek %v", q)
		if ok {
			require.Equal(t, want, got, "seek %v", q)
			require.Equal(t, md.locs[want], loc, "seek %v loc", q)
		}
		got, loc, ok, err = r.Prev(q)
		require.NoError(t, err)
		want, wok = md.prev(q)
		require.Equal(t, wok, ok, "prev %v", q)
		if ok {
			require.Equal(t, want, got, "prev %v", q)
			require.Equal(t, md.locs[want], loc, "prev %v loc", q)
		}
		loc, ok, err = r.Get(q)
		require.NoError(t, err)
		wl, wok := md.locs[q]
		require.Equal(t, wok, ok, "get %v", q)
		require.Equal(t, wl, loc*boolU(ok), "get %v", q)
	}
}

func boolU(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// verifyAll compares a full scan in both orders.
func verifyAll(t *testing.T, r reads, md *model) {
	t.Helper()
	var got []Key
	require.NoError(t, r.Ascend(Key{}, func(k Key, loc uint64) bool {
		require.Equal(t, md.locs[k], loc, "ascend %v", k)
		got = append(got, k)
		return true
	}))
	require.Equal(t, len(md.keys), len(got))
	if len(got) > 0 {
		require.Equal(t, md.keys, got)
	}
	byEpoch := map[[2]uint32][]uint64{}
	for _, k := range md.keys {
		be := [2]uint32{k.B, k.E}
		byEpoch[be] = append(byEpoch[be], k.C)
	}
	// NextEpoch from every epoch of every branch seen, and past them
	for be := range byEpoch {
		for _, e := range []uint32{be[1], be[1] - 1, be[1] + 1, 0} {
			want, wok := uint32(0), false
			for k := range byEpoch {
				if k[0] == be[0] && k[1] >= e && (!wok || k[1] < want) {
					want, wok = k[1], true
				}
			}
			got, ok, err := r.NextEpoch(be[0], e)
			require.NoError(t, err)
			require.Equal(t, wok, ok, "next epoch b%d e%d", be[0], e)
			require.Equal(t, want, got, "next epoch b%d e%d", be[0], e)
		}
	}
	for be, want := range byEpoch {
		var cs []uint64
		require.NoError(t, r.AscendEpoch(be[0], be[1], 0, func(c uint64) bool { cs = append(cs, c); return true }))
		require.Equal(t, want, cs, "epoch scan b%d e%d", be[0], be[1])
	}
}

type keySpace struct {
	branches uint32
	chunks   uint64
	epochs   uint32
	// spread: crashStep takes half its data chunks at random below
	// spread (MarkData), not in order, so that they fall on every page of
	// a data map of several pages (0: in order only).
	spread uint64
}

func (s keySpace) random(rng *rand.Rand) Key {
	e := 1 + rng.Uint32N(s.epochs)
	if rng.IntN(10) == 0 {
		e = 0xffffffff
	}
	return Key{B: rng.Uint32N(s.branches), C: rng.Uint64N(s.chunks), E: e}
}

// workload drives a Meta and a model with random operations: single puts,
// sequential bursts (one epoch, consecutive chunks and data chunks, which
// become runs), deletes with their data freed, special locations.
type workload struct {
	t     *testing.T
	rng   *rand.Rand
	m     *Meta
	md    *model
	space keySpace
	drain bool // mostly deletes
}

func (w *workload) step() {
	t, rng := w.t, w.rng
	op := rng.IntN(10)
	if w.drain {
		op = 6 + rng.IntN(4)*rng.IntN(2)
	}
	switch {
	case op < 4:
		k := w.space.random(rng)
		if _, ok := w.md.locs[k]; ok {
			return
		}
		loc := LocSpecial + uint64(rng.IntN(2))
		if rng.IntN(8) != 0 {
			var err error
			loc, err = w.m.AllocData()
			require.NoError(t, err)
		}
		require.NoError(t, w.m.Put(k, loc), "put %v", k)
		w.md.put(k, loc)
	case op < 6:
		k := w.space.random(rng)
		n := 1 + rng.IntN(40)
		for i := 0; i < n && k.C < w.space.chunks; i++ {
			if _, ok := w.md.locs[k]; !ok {
				loc, err := w.m.AllocData()
				require.NoError(t, err)
				require.NoError(t, w.m.Put(k, loc), "put %v", k)
				w.md.put(k, loc)
			}
			k.C++
		}
	default:
		if len(w.md.keys) == 0 {
			return
		}
		k := w.md.keys[rng.IntN(len(w.md.keys))]
		loc, err := w.m.Delete(k)
		require.NoError(t, err, "delete %v", k)
		require.Equal(t, w.md.locs[k], loc)
		if loc < LocSpecial {
			require.NoError(t, w.m.FreeData(loc))
		}
		w.md.del(k)
	}
}

func newMemMeta(t *testing.T, pages uint64, chunks uint64, cache int) (*blockdev.Mem, *Meta) {
	t.Helper()
	dev, err := blockdev.NewMem(int64(pages)*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: chunks, CacheBytes: cache})
	require.NoError(t, err)
	return dev, m
}

// TestModel runs random operations with commits, reopens and a cache far
// smaller than the tree (so nodes are written back, evicted and re-read),
// and compares every answer with the model.
func TestModel(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	for _, cache := range []int{16 << 10, 1 << 20} {
		dev, m := newMemMeta(t, 4096, 1<<16, cache)
		w := &workload{t: t, rng: rng, m: m, md: newModel(), space: keySpace{branches: 3, chunks: 3000, epochs: 6}}
		committed := w.md.clone()
		steps := 4000
		if testing.Short() {
			steps = 1000
		}
		for i := range steps {
			w.step()
			if i%97 == 0 {
				verifyQueries(t, rng, m, w.md, 20, w.space)
			}
			switch rng.IntN(300) {
			case 0, 1, 2:
				require.NoError(t, m.Commit())
				committed = w.md.clone()
				require.NoError(t, m.Check())
			case 3:
				// reopen without commit: back to the last commit
				require.NoError(t, m.Close())
				var err error
				m, err = Open(dev, Options{CacheBytes: cache})
				require.NoError(t, err)
				w.m, w.md = m, committed.clone()
				verifyAll(t, m, w.md)
			}
		}
		verifyAll(t, m, w.md)
		require.NoError(t, m.Commit())
		require.NoError(t, m.Check())
		st := m.Stats()
		t.Logf("cache %d: %d keys in %d chunk runs, %d epoch runs, levels %d/%d", cache, st.Keys, st.ChunkRuns, st.EpochRuns, st.ChunkLevels, st.EpochLevels)
		// drain: deletes shrink the trees, nodes join, pages come back
		used := m.Space().PagesUsed
		w.drain = true
		for len(w.md.keys) > 50 {
			w.step()
			if rng.IntN(500) == 0 {
				require.NoError(t, m.Commit())
				require.NoError(t, m.Check())
			}
		}
		verifyAll(t, m, w.md)
		require.NoError(t, m.Commit())
		require.NoError(t, m.Commit())
		require.NoError(t, m.Check())
		if st.ChunkLevels > 1 {
			require.Less(t, m.Space().PagesUsed, used, "nodes joined and pages were freed")
		}
		require.LessOrEqual(t, m.Space().PagesUsed, used)
		st = m.Stats()
		cs := m.CacheStats()
		t.Logf("cache %d: %d keys in %d chunk runs, %d epoch runs, levels %d/%d; cache %+v", cache, st.Keys, st.ChunkRuns, st.EpochRuns, st.ChunkLevels, st.EpochLevels, cs)
		require.NoError(t, m.Close())
		// a read-only Open on a device that refuses writes: Check writes nothing
		m, err := Open(blockdev.ReadOnly(dev), Options{CacheBytes: cache, ReadOnly: true})
		require.NoError(t, err)
		verifyAll(t, m, w.md)
		require.NoError(t, m.Check())
		require.ErrorIs(t, m.Put(Key{}, 1), ErrReadOnly)
		require.ErrorIs(t, m.Commit(), ErrReadOnly)
		require.NoError(t, m.Close())
		require.ErrorIs(t, m.Close(), ErrClosed)
		_, _, _, err = m.Seek(Key{})
		require.ErrorIs(t, err, ErrClosed)
	}
}

// TestRuns: a sequential fill is a handful of runs; deleting from the
// middle splits one.
func TestRuns(t *testing.T) {
	_, m := newMemMeta(t, 1024, 1<<20, 0)
	const n = 100000
	for c := uint64(0); c < n; c++ {
		loc, err := m.AllocData()
		require.NoError(t, err)
		require.NoError(t, m.Put(Key{B: 0, C: c, E: 1}, loc))
	}
	st := m.Stats()
	require.EqualValues(t, n, st.Keys)
	require.LessOrEqual(t, st.ChunkRuns, uint64(4), "a sequential fill is one run per leaf at most")
	require.LessOrEqual(t, st.EpochRuns, uint64(4))
	loc, err := m.Delete(Key{B: 0, C: 500, E: 1})
	require.NoError(t, err)
	require.EqualValues(t, 500, loc)
	require.NoError(t, m.FreeData(loc))
	require.EqualValues(t, st.ChunkRuns+1, m.Stats().ChunkRuns)
	k, l, ok, err := m.Seek(Key{B: 0, C: 500, E: 0})
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, Key{B: 0, C: 501, E: 1}, k)
	require.EqualValues(t, 501, l)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	sp := m.Space()
	require.LessOrEqual(t, sp.PagesUsed, uint64(2+2+pagesFor(1<<20)+1+4), "100k sequential keys fit in a few pages beside the maps")
}
