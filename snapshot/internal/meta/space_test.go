package meta

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestNoSpace fills a small metadata region with random keys until a Put
// fails with ErrNoSpace, then checks that nothing was half-done, that the
// region commits and passes Check, that deletes still work and free pages,
// that the low-space callback fired, and that Grow makes room.
func TestNoSpace(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 3))
	const pages, devPages = 200, 500
	dev, err := blockdev.NewMem(devPages*PageSize, 4096)
	require.NoError(t, err)
	var lowCalls int
	var lowFree uint64
	opts := Options{Pages: pages, DataChunks: 1 << 16, CacheBytes: 64 << 10, LowSpaceThreshold: 150,
		LowSpace: func(free, total uint64) { lowCalls++; lowFree = free; require.EqualValues(t, pages, total) }}
	m, err := Format(dev, opts)
	require.NoError(t, err)
	md := newModel()
	var full error
	for i := 0; full == nil; i++ {
		k := Key{B: rng.Uint32N(4), C: rng.Uint64N(1 << 30), E: 1 + rng.Uint32N(1000)}
		loc, err := m.AllocData()
		require.NoError(t, err)
		if err := m.Put(k, loc); err != nil {
			full = err
			require.NoError(t, m.FreeData(loc))
			break
		}
		md.put(k, loc)
		if i%500 == 0 {
			require.NoError(t, m.Commit())
		}
	}
	require.ErrorIs(t, full, ErrNoSpace)
	require.GreaterOrEqual(t, lowCalls, 1, "the callback fires on each crossing")
	require.Less(t, lowFree, uint64(150))
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	verifyAll(t, m, md)

	// deletes work on a full region and, once committed, free pages
	before := m.Space().PagesUsed
	t.Logf("full at %d keys, %d of %d pages in use", len(md.keys), before, pages)
	for len(md.keys) > 10 {
		k := md.keys[rng.IntN(len(md.keys))]
		loc, err := m.Delete(k)
		require.NoError(t, err)
		require.NoError(t, m.FreeData(loc))
		md.del(k)
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	require.Less(t, m.Space().PagesUsed, before)
	verifyAll(t, m, md)

	// Grow past the formatted size; then puts fit again
	require.ErrorIs(t, m.Grow(devPages+1), ErrInvalid)
	require.NoError(t, m.Grow(devPages))
	for range 2000 {
		k := Key{B: rng.Uint32N(4), C: rng.Uint64N(1 << 30), E: 1 + rng.Uint32N(1000)}
		loc, err := m.AllocData()
		require.NoError(t, err)
		require.NoError(t, m.Put(k, loc))
		md.put(k, loc)
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
	m, err = Open(dev, Options{})
	require.NoError(t, err)
	require.EqualValues(t, devPages, m.Space().Pages)
	verifyAll(t, m, md)
	require.NoError(t, m.Check())
}

// TestDataSpace: data chunks run out with ErrNoSpace, a freed chunk is not
// reused before its transaction commits, and GrowData adds chunks.
func TestDataSpace(t *testing.T) {
	_, m := newMemMeta(t, 256, 100, 0)
	var locs []uint64
	for range 100 {
		loc, err := m.AllocData()
		require.NoError(t, err)
		locs = append(locs, loc)
	}
	_, err := m.AllocData()
	require.ErrorIs(t, err, ErrNoSpace)
	require.NoError(t, m.FreeData(locs[7]))
	_, err = m.AllocData()
	require.ErrorIs(t, err, ErrNoSpace, "a chunk freed in the open transaction is not reused")
	require.ErrorIs(t, m.FreeData(locs[7]), ErrInvalid)
	require.NoError(t, m.Commit())
	loc, err := m.AllocData()
	require.NoError(t, err)
	require.Equal(t, locs[7], loc)
	_, err = m.PutData(Key{C: 1, E: 1})
	require.ErrorIs(t, err, ErrNoSpace)
	require.NoError(t, m.GrowData(200, false))
	loc, err = m.PutData(Key{C: 1, E: 1})
	require.NoError(t, err)
	require.EqualValues(t, 100, loc)
	_, err = m.PutData(Key{C: 1, E: 1})
	require.ErrorIs(t, err, ErrExists, "a failed PutData frees its chunk at once")
	loc, err = m.AllocData()
	require.NoError(t, err)
	require.EqualValues(t, 101, loc)
	require.NoError(t, m.Put(Key{C: 2, E: 1}, loc))
	for _, l := range locs {
		if l != locs[7] {
			require.NoError(t, m.Put(Key{C: 1000 + l, E: 1}, l))
		}
	}
	require.NoError(t, m.Put(Key{C: 3, E: 1}, locs[7]))
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
}

// TestGrowDataHeld: chunks a held grow adds are not allocated before the
// transaction recording the grown map commits, even with a view open; a
// reopen without that commit has the old map, with it the grown one.
func TestGrowDataHeld(t *testing.T) {
	dev, m := newMemMeta(t, 256, 100, 0)
	for range 100 {
		_, err := m.AllocData()
		require.NoError(t, err)
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.GrowData(164, true))
	require.EqualValues(t, 164, m.Space().Chunks)
	require.EqualValues(t, 64, m.DataHeld())
	_, err := m.AllocData()
	require.ErrorIs(t, err, ErrNoSpace, "a held grown chunk was allocated before its commit")
	require.NoError(t, m.Close()) // no commit: as a crash leaves it

	m, err = Open(dev, Options{})
	require.NoError(t, err)
	require.EqualValues(t, 100, m.Space().Chunks)
	require.NoError(t, m.GrowData(164, true))
	v := m.View() // an old view does not keep grown chunks held
	require.NoError(t, m.Commit())
	require.Zero(t, m.DataHeld())
	loc, err := m.AllocData()
	require.NoError(t, err)
	require.EqualValues(t, 100, loc)
	v.Release()
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())

	m, err = Open(dev, Options{})
	require.NoError(t, err)
	defer m.Close()
	require.EqualValues(t, 164, m.Space().Chunks)
	require.EqualValues(t, 101, m.Space().ChunksUsed)
}

// TestViews: a view reads its committed transaction while the writer goes
// on changing and committing; its pages are not reused until Release.
func TestViews(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 4))
	_, m := newMemMeta(t, 4096, 1<<16, 32<<10)
	w := &workload{t: t, rng: rng, m: m, md: newModel(), space: keySpace{branches: 2, chunks: 2000, epochs: 5}}
	rounds := 10
	if testing.Short() {
		rounds = 3
	}
	for range 1500 {
		w.step()
	}
	require.NoError(t, m.Commit())
	v := m.View()
	frozen := w.md.clone()
	for round := range rounds {
		for range 300 {
			w.step()
		}
		require.NoError(t, m.Commit())
		verifyQueries(t, rng, v, frozen, 50, w.space)
		if round%3 == 0 {
			verifyAll(t, v, frozen)
		}
	}
	require.NoError(t, v.Check())
	v.Release()
	v.Release() // twice is harmless
	_, _, _, err := v.Seek(Key{})
	require.ErrorIs(t, err, ErrClosed)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	verifyAll(t, m, w.md)
}

// TestBadOpen: an unformatted or foreign device is refused with
// ErrCorrupt, and bad geometry with ErrInvalid.
func TestBadOpen(t *testing.T) {
	dev, err := blockdev.NewMem(64*PageSize, 4096)
	require.NoError(t, err)
	_, err = Open(dev, Options{})
	require.ErrorIs(t, err, ErrCorrupt)
	_, err = Format(dev, Options{Pages: 8})
	require.ErrorIs(t, err, ErrInvalid)
	_, err = Format(dev, Options{Pages: 65})
	require.ErrorIs(t, err, ErrInvalid)
	_, err = Format(dev, Options{DataChunks: 1 << 40})
	require.ErrorIs(t, err, ErrInvalid)
}

// TestHoldRun: holdRun and unholdRun hold and release exactly the bits of
// their run, across word and bitmap page boundaries, as hold and unhold bit
// by bit would; a page's held words go once it holds nothing.
func TestHoldRun(t *testing.T) {
	const p = bitsPerPage
	for _, r := range [][2]uint64{{0, 0}, {0, 1}, {3, 64}, {60, 70}, {64, 128}, {100, 164}, {1, 1000}, {127, 129},
		{p - 10, p + 10}, {p - 1, 2*p + 1}, {0, 3 * p}} {
		s, want := newSpaceMap(3*p), newSpaceMap(3*p)
		s.holdRun(r[0], r[1])
		for i := r[0]; i < r[1]; i++ {
			want.hold(i)
		}
		require.Equal(t, want.held, s.held, "run %v", r)
		require.Equal(t, want.nheld, s.nheld, "run %v", r)
		for i := range uint64(3 * p) {
			require.Equal(t, i >= r[0] && i < r[1], s.isHeld(i), "run %v bit %d", r, i)
		}
		s.unholdRun(r[0], r[1])
		require.Equal(t, make([]*heldPage, 3), s.held, "run %v", r)
		require.Zero(t, s.nheld, "run %v", r)
	}
}

// TestHeldPages: held bits are kept by bitmap page, only while the page
// has some; alloc passes over them, and unhold of one page leaves the
// others'.
func TestHeldPages(t *testing.T) {
	const p = bitsPerPage
	s := newSpaceMap(3 * p)
	s.hold(0)
	s.hold(2*p + 5)
	require.NotNil(t, s.held[0])
	require.Nil(t, s.held[1])
	require.NotNil(t, s.held[2])
	require.EqualValues(t, 2, s.nheld)
	i, ok := alloc(t, s)
	require.True(t, ok)
	require.EqualValues(t, 1, i, "a held bit is not allocated")
	s.unhold(0)
	require.Nil(t, s.held[0], "a page that holds nothing has no words")
	require.True(t, s.isHeld(2*p+5))
	require.False(t, s.isHeld(0))
	require.EqualValues(t, 3*p-2, s.free())
	require.EqualValues(t, 1, s.nheldP)
	s.unhold(2*p + 5)
	require.Equal(t, make([]*heldPage, 3), s.held)
	require.Zero(t, s.nheldP)
}

// TestSpaceMapSharedPages: set, clear, alloc and load against a model of
// plain bits, over a map of three and a half pages driven to full, empty
// and back. Pages all clear share emptyBits, whole pages all set share
// fullBits (never written), the others own their words; used and the
// per-page counts agree with the bits; an encoded page loads back the same.
func TestSpaceMapSharedPages(t *testing.T) {
	const nbits = 3*bitsPerPage + bitsPerPage/2
	rng := rand.New(rand.NewPCG(1, 2))
	s, model := newSpaceMap(nbits), make([]bool, nbits)
	verify := func(step int) {
		used := uint64(0)
		for pi, p := range s.words {
			n := uint64(0)
			for i := uint64(pi) * bitsPerPage; i < min(nbits, uint64(pi+1)*bitsPerPage); i++ {
				if model[i] {
					n++
				}
			}
			used += n
			require.EqualValues(t, n, s.setN[pi], "step %d page %d", step, pi)
			switch {
			case n == 0:
				require.Same(t, emptyBits, p, "step %d page %d", step, pi)
			case n == bitsPerPage:
				require.Same(t, fullBits, p, "step %d page %d", step, pi)
			default:
				require.True(t, p != emptyBits && p != fullBits, "step %d page %d", step, pi)
			}
		}
		require.Equal(t, used, s.used, "step %d", step)
		owned := 0
		for _, p := range s.words {
			if p != emptyBits && p != fullBits {
				owned++
			}
		}
		require.Equal(t, owned, s.owned, "step %d", step)
		require.EqualValues(t, owned*PageSize-owned*headerSize, s.memBytes(), "step %d", step)
		for i := range uint64(nbits) {
			if got := isSet(t, s, i); got != model[i] {
				t.Fatalf("step %d: bit %d is %v, want %v", step, i, got, model[i])
			}
		}
	}
	for step := range 40 {
		switch step % 4 {
		case 0: // fill by alloc: next-fit passes over the full pages
			for range rng.IntN(nbits) {
				i, ok := alloc(t, s)
				if !ok {
					require.Zero(t, s.free(), "step %d: alloc failed with bits free", step)
					break
				}
				require.False(t, model[i], "step %d: alloc gave set bit %d", step, i)
				model[i] = true
			}
		case 1: // clear a random range
			from := rng.Uint64N(nbits)
			for i := from; i < min(nbits, from+rng.Uint64N(2*bitsPerPage)); i++ {
				if model[i] {
					s.clear(i)
					model[i] = false
				}
			}
		case 2: // scattered sets and clears
			for range 1000 {
				i := rng.Uint64N(nbits)
				if model[i] {
					s.clear(i)
				} else {
					s.set(i)
				}
				model[i] = !model[i]
			}
		case 3: // everything, or nothing, every other time
			for i := range uint64(nbits) {
				if want := step%8 == 3; model[i] != want {
					if want {
						s.set(i)
					} else {
						s.clear(i)
					}
					model[i] = want
				}
			}
		}
		verify(step)
		// Encode every page and load it into a fresh map.
		fresh := newSpaceMap(nbits)
		buf := make([]byte, PageSize)
		for pi := range s.words {
			s.encodeBitmap(buf, pi, 9, 1)
			bits := new(bitPage)
			require.NoError(t, decodeBitmap(buf, 9, 1, pi, nbits, bits))
			fresh.load(pi, bits)
		}
		require.Equal(t, s.used, fresh.used)
		require.Equal(t, s.setN, fresh.setN)
		for pi := range s.words {
			require.Equal(t, *s.words[pi], *fresh.words[pi], "step %d page %d", step, pi)
			require.Equal(t, s.words[pi] == emptyBits || s.words[pi] == fullBits, fresh.words[pi] == emptyBits || fresh.words[pi] == fullBits)
		}
	}
	require.Equal(t, bitPage{}, *emptyBits, "the shared pages are never written")
	for _, w := range fullBits {
		require.Equal(t, ^uint64(0), w)
	}
}

// TestAllocPastFullPage: next-fit passes over a full page to the first
// word of the next, and wraps around to find the one free bit.
func TestAllocPastFullPage(t *testing.T) {
	for _, free := range []uint64{bitsPerPage, bitsPerPage + 64, 2*bitsPerPage - 1, 5} {
		s := newSpaceMap(2 * bitsPerPage)
		for i := range uint64(2 * bitsPerPage) {
			if i != free {
				s.set(i)
			}
		}
		require.Same(t, fullBits, s.words[map[bool]int{true: 1, false: 0}[free < bitsPerPage]])
		s.cursor = 0
		if free < bitsPerPage {
			s.cursor = wordsPerPage + 3 // in the full page 1: wraps to page 0
		}
		i, ok := alloc(t, s)
		require.True(t, ok, "free bit %d", free)
		require.Equal(t, free, i)
		_, ok = alloc(t, s)
		require.False(t, ok)
	}
}

// TestCheckMapsPastFirstPage: Check reads each space map a bitmap page at
// a time; a leaked data chunk and a referenced one marked free, both in
// the map's third page, are reported at their own numbers.
func TestCheckMapsPastFirstPage(t *testing.T) {
	dev, err := blockdev.NewMem(512*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 3 * bitsPerPage, SyncWriteBack: true})
	require.NoError(t, err)
	defer m.Close()
	leak, used := uint64(2*bitsPerPage+77), uint64(2*bitsPerPage+300)
	require.NoError(t, m.MarkData(leak)) // allocated, never referenced
	require.NoError(t, m.MarkData(used))
	require.NoError(t, m.Put(Key{B: 1, C: 5, E: 1}, used))
	require.NoError(t, m.Commit())
	err = m.Check()
	require.ErrorContains(t, err, fmt.Sprintf("data chunk %d is marked in use but nothing reaches it (leak)", leak))
	require.NotContains(t, err.Error(), fmt.Sprintf("data chunk %d ", used))

	m.mu.Lock()
	m.dataSM.clear(used) // referenced, and now marked free
	m.dataSM.clear(leak)
	m.changed = true
	m.mu.Unlock()
	require.NoError(t, m.Commit())
	err = m.Check()
	require.ErrorContains(t, err, fmt.Sprintf("data chunk %d is in use but marked free", used))
	require.NotContains(t, err.Error(), fmt.Sprintf("data chunk %d ", leak))
}

// isSet is spaceMap.isSet for a test: a read error fails it.
func isSet(t testing.TB, s *spaceMap, i uint64) bool {
	t.Helper()
	v, err := s.isSet(i)
	require.NoError(t, err)
	return v
}

// alloc is spaceMap.alloc for a test: a read error fails it.
func alloc(t testing.TB, s *spaceMap) (uint64, bool) {
	t.Helper()
	i, ok, err := s.alloc()
	require.NoError(t, err)
	return i, ok
}
