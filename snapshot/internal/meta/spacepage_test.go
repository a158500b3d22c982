package meta

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// pagedMap is a space map that pages out to an in-memory "disk": a commit
// encodes its dirty pages there, and fetch reads them back, failing while
// fail is set and flipping a bit of the next read when flip is.
type pagedMap struct {
	s     *spaceMap
	disk  map[uint64][]byte // by location
	tx    uint64
	next  uint64 // next location
	fail  bool
	flip  bool
	reads int
	// failStore makes store fail; stores counts its writes.
	failStore bool
	stores    int
	// pending is what freeze encoded and write has not put on the disk
	// yet (a commit whose writes are in flight).
	pending map[uint64][]byte
}

var errFetch = errors.New("fetch failed")

func newPagedMap(nbits uint64, limit int) *pagedMap {
	pm := &pagedMap{s: newSpaceMap(nbits), disk: map[uint64][]byte{}, tx: 1, next: 2}
	pm.s.limit = limit
	pm.s.fetch = func(pi uint64, raw []byte, p *bitPage) error {
		pm.reads++
		if pm.fail {
			return errFetch
		}
		bp := pm.s.pages[pi]
		copy(raw, pm.disk[bp.loc])
		if pm.flip {
			pm.flip = false
			raw[headerSize+17] ^= 4
		}
		return decodeBitmap(raw, bp.loc, bp.tx, int(pi), pm.s.nbits, p)
	}
	return pm
}

// withStore gives the map a store that writes a dirty page at once to its
// location of the open transaction (a new one the first time in it).
func (pm *pagedMap) withStore() *pagedMap {
	pm.s.store = func(pi uint64, raw []byte) error {
		if pm.failStore {
			return errFetch
		}
		pm.shadow(pi)
		pm.s.encodeBitmap(raw, int(pi), pm.s.pages[pi].loc, pm.tx)
		pm.disk[pm.s.pages[pi].loc] = append([]byte(nil), raw...)
		pm.stores++
		return nil
	}
	return pm
}

// shadow gives page pi a location of the open transaction unless it has
// one.
func (pm *pagedMap) shadow(pi uint64) {
	if pm.s.pages[pi].tx != pm.tx {
		pm.s.pages[pi] = ptr{loc: pm.next, tx: pm.tx}
		pm.next++
	}
}

// freeze encodes the dirty pages, copy-on-write (each at a new location),
// for write to put on the disk, and starts the next transaction.
func (pm *pagedMap) freeze() {
	s := pm.s
	pm.pending = map[uint64][]byte{}
	for pi, d := range s.dirtyPage {
		if !d {
			continue
		}
		pm.shadow(uint64(pi))
		buf := make([]byte, PageSize)
		s.encodeBitmap(buf, pi, s.pages[pi].loc, pm.tx)
		pm.pending[s.pages[pi].loc] = buf
	}
	clear(s.dirtyPage)
	pm.tx++
}

// write puts what freeze encoded on the disk and makes its transaction
// durable.
func (pm *pagedMap) write() {
	for loc, buf := range pm.pending {
		pm.disk[loc] = buf
	}
	pm.pending = nil
	pm.s.setDurable(pm.tx - 1)
}

func (pm *pagedMap) commit() {
	pm.freeze()
	pm.write()
}

// TestSpaceMapPaging drives a map of five and a half pages, kept to one or
// two pages of its own, with allocs, sets, clears, holds, runs from the
// top and commits, against a model of plain bits. After each commit the
// map is within its limit; pages are paged out and read back; a read
// (peek, isSet) gives the model's bits; a read back that fails, or that
// finds a bit flipped, returns its error and changes nothing.
func TestSpaceMapPaging(t *testing.T) {
	const nbits = 5*bitsPerPage + bitsPerPage/2
	for _, c := range []struct {
		limit int
		store bool
	}{{1, false}, {2, false}, {1, true}, {2, true}} {
		limit := c.limit
		rng := rand.New(rand.NewPCG(uint64(limit), 7))
		pm := newPagedMap(nbits, limit)
		if c.store {
			pm.withStore()
		}
		s, model, held := pm.s, make([]bool, nbits), map[uint64]bool{}
		verify := func(step int) {
			t.Helper()
			raw, buf := make([]byte, PageSize), new(bitPage)
			used := uint64(0)
			for pi := range s.words {
				p, err := s.peek(uint64(pi), raw, buf)
				require.NoError(t, err)
				n := uint32(0)
				for i := uint64(pi) * bitsPerPage; i < min(nbits, uint64(pi+1)*bitsPerPage); i++ {
					got := p[(i/64)%wordsPerPage]&(1<<(i%64)) != 0
					if got != model[i] {
						t.Fatalf("limit %d step %d: bit %d is %v, want %v", limit, step, i, got, model[i])
					}
					if got {
						n++
					}
				}
				require.Equal(t, n, s.setN[pi], "limit %d step %d page %d", limit, step, pi)
				used += uint64(n)
			}
			require.Equal(t, used, s.used)
			require.EqualValues(t, len(held), s.nheld)
			owned, out := 0, 0
			for _, p := range s.words {
				switch p {
				case nil:
					out++
				case emptyBits, fullBits:
				default:
					owned++
				}
			}
			require.Equal(t, owned, s.owned, "limit %d step %d", limit, step)
			require.Equal(t, out, s.out, "limit %d step %d", limit, step)
		}
		for step := range 300 {
			switch rng.IntN(6) {
			case 0: // alloc a few
				for range rng.IntN(3000) {
					i, ok := alloc(t, s)
					if !ok {
						require.Zero(t, s.free())
						break
					}
					require.False(t, model[i] || held[i], "limit %d step %d: alloc gave bit %d, in use or held", limit, step, i)
					model[i] = true
				}
			case 1: // free some: clear and hold
				for range rng.IntN(200) {
					i := rng.Uint64N(nbits)
					if model[i] {
						require.NoError(t, s.clear(i))
						s.hold(i)
						model[i], held[i] = false, true
					}
				}
			case 2: // release what is held
				for i := range held {
					s.unhold(i)
					delete(held, i)
				}
			case 3: // scattered flips
				for range 300 {
					i := rng.Uint64N(nbits)
					if held[i] {
						continue
					}
					if model[i] {
						require.NoError(t, s.clear(i))
					} else {
						require.NoError(t, s.set(i))
					}
					model[i] = !model[i]
				}
			case 4: // a run from the top, as GrowFromData takes
				n := 1 + rng.Uint64N(100)
				first, ok, err := s.freeRunFromTop(n)
				require.NoError(t, err)
				want, wantOK := uint64(0), false
				for c, run := uint64(nbits), uint64(0); c > 0; c-- {
					if model[c-1] || held[c-1] {
						run = 0
					} else if run++; run == n {
						want, wantOK = c-1, true
						break
					}
				}
				require.Equal(t, wantOK, ok, "limit %d step %d: run of %d", limit, step, n)
				require.Equal(t, want, first, "limit %d step %d: run of %d", limit, step, n)
			case 5: // isSet of random bits
				for range 50 {
					i := rng.Uint64N(nbits)
					require.Equal(t, model[i], isSet(t, s, i))
				}
			}
			if c.store && pm.pending == nil {
				require.LessOrEqual(t, s.owned, limit, "limit %d step %d: over the limit with dirty pages written out", limit, step)
			}
			switch {
			case pm.pending != nil: // a commit's writes done, after the step's changes
				pm.write()
			case rng.IntN(3) == 0:
				pm.commit()
				require.LessOrEqual(t, s.owned, limit, "limit %d step %d: over the limit after a commit", limit, step)
			case rng.IntN(3) == 0:
				pm.freeze() // the next step's changes come before its writes
			}
			verify(step)
		}
		require.Positive(t, pm.reads, "limit %d: nothing was read back", limit)
		require.Positive(t, s.reads, "limit %d", limit)
		if c.store {
			require.Positive(t, pm.stores, "limit %d: no dirty page was written out", limit)
			require.EqualValues(t, pm.stores, s.writes)
			// A store that fails: the page stays dirty, in memory, and
			// the map over its limit until a commit.
			if pm.pending != nil {
				pm.write()
			}
			pm.commit()
			pm.failStore = true
			for pi := range uint64(len(s.words)) {
				i := pi*bitsPerPage + 1
				if s.words[pi] == nil || s.words[pi] == emptyBits {
					if model[i] || held[i] {
						continue
					}
					require.NoError(t, s.set(i))
					model[i] = true
				}
			}
			require.Greater(t, s.owned, limit)
			require.True(t, s.stuck)
			verify(-2)
			pm.failStore = false
			pm.commit()
			require.LessOrEqual(t, s.owned, limit)
			verify(-3)
		}

		// A read back that fails, then one with a bit flipped: each an
		// error, nothing changed.
		if pm.pending != nil {
			pm.write()
		}
		pm.commit()
		pi := -1
		for i, p := range s.words {
			if p == nil {
				pi = i
				break
			}
		}
		require.GreaterOrEqual(t, pi, 0, "limit %d: no page paged out", limit)
		i := uint64(pi)*bitsPerPage + 5
		free, used := s.free(), s.used
		pm.fail = true
		_, err := s.isSet(i)
		require.ErrorIs(t, err, errFetch)
		require.ErrorIs(t, s.set(i), errFetch)
		require.ErrorIs(t, s.clear(i), errFetch)
		pm.fail = false
		pm.flip = true
		_, err = s.isSet(i)
		require.ErrorIs(t, err, ErrCorrupt)
		require.Nil(t, s.words[pi], "a failed read back leaves the page paged out")
		require.Equal(t, free, s.free())
		require.Equal(t, used, s.used)
		require.False(t, s.dirtyPage[pi])
		verify(-1)
		require.Equal(t, model[i], isSet(t, s, i), "read back once the device works again")
	}
}

// TestAllocSkipsPagedOutFullPage: a page whose bits are all set or held is
// passed over by its counts, not read back; alloc finds the free bit in
// the next page.
func TestAllocSkipsPagedOutFullPage(t *testing.T) {
	pm := newPagedMap(3*bitsPerPage, 1)
	s := pm.s
	for i := range uint64(2*bitsPerPage + 10) {
		require.NoError(t, s.set(i))
	}
	// Page 0: one bit held, the rest set; page 1 all set; page 2 from bit
	// 10 free.
	require.NoError(t, s.clear(3))
	s.hold(3)
	pm.commit()
	require.NoError(t, s.set(2*bitsPerPage+10)) // page 2 dirty, in memory
	pm.commit()
	require.Nil(t, s.words[0], "page 0 is paged out")
	s.cursor = 0
	reads := pm.reads
	i, ok := alloc(t, s)
	require.True(t, ok)
	require.EqualValues(t, 2*bitsPerPage+11, i)
	require.Equal(t, reads, pm.reads, "page 0 was read back")
}

// TestDataMapPagedOut: a store whose data chunks are every one partly
// used, by page, with a data map limited to one page of memory. Through
// commits, a reopen and a failed read back, the map stays within its
// limit, in a transaction that changes every page too (they are written
// out), allocates exactly the free chunks, and Check agrees with it; a
// read error is returned and changes nothing.
func TestDataMapPagedOut(t *testing.T) {
	const chunks = 6*bitsPerPage + 100
	mem, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	dev := blockdevtest.NewFaulty(mem)
	page := uint64(len(bitPage{}) * 8)
	// MapBytes counts the metadata map too: one page, partly used.
	limit := 2 * page
	opts := Options{DataChunks: chunks, MapBytes: int(page), SyncWriteBack: true}
	m, err := Format(dev, opts)
	require.NoError(t, err)
	// Fill: chunk i for key i.
	locOf := make(map[uint64]uint64)
	for c := range uint64(chunks) {
		loc, err := m.PutData(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
		locOf[c] = loc
	}
	require.NoError(t, m.Commit())
	// Free every third: each page partly used.
	free := map[uint64]bool{}
	for c := uint64(0); c < chunks; c += 3 {
		loc, err := m.Delete(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
		require.NoError(t, m.FreeData(loc))
		free[loc] = true
		delete(locOf, c)
	}
	// Every page changed in the open transaction: written out, not kept.
	m.mu.RLock()
	owned, lim := m.dataSM.owned, m.dataSM.limit
	m.mu.RUnlock()
	require.LessOrEqual(t, owned, lim, "dirty pages kept past the limit")
	require.Positive(t, m.Space().MapWrites)
	require.NoError(t, m.Commit())
	m.ReleaseFrees()
	sp := m.Space()
	require.LessOrEqual(t, sp.MapBytes, limit, "the data map past its limit after a commit")
	require.GreaterOrEqual(t, sp.MapPagedOut, uint64(5))
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())

	// Reopen: the map is read and paged out as it is read.
	m, err = Open(dev, opts)
	require.NoError(t, err)
	sp = m.Space()
	require.LessOrEqual(t, sp.MapBytes, limit, "the data map past its limit after Open")
	require.EqualValues(t, chunks-len(free), sp.ChunksUsed)

	// A read back that fails: the error, nothing taken.
	injected := errors.New("injected read error")
	dev.FailNth(blockdevtest.OpRead, dev.Count(blockdevtest.OpRead)+1, injected)
	var got []uint64
	for {
		got, err = m.AllocDataBatch(got[:0], 512)
		if err != nil {
			break
		}
		for _, loc := range got {
			require.True(t, free[loc], "chunk %d allocated, not free", loc)
			delete(free, loc)
			require.NoError(t, m.ReturnData(loc)) // back, free at once
			free[loc] = true
		}
		require.Positive(t, len(got))
		if m.Space().MapReads > 3 {
			t.Fatal("the injected read error was never met")
		}
	}
	require.ErrorIs(t, err, injected)
	dev.Clear()
	require.EqualValues(t, chunks-len(free), m.Space().ChunksUsed)

	// Take every free chunk, in keys past the others.
	for c := uint64(chunks); len(free) > 0; c++ {
		loc, err := m.PutData(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
		require.True(t, free[loc], "chunk %d allocated, not free", loc)
		delete(free, loc)
		locOf[c] = loc
	}
	_, err = m.PutData(Key{B: 2, C: 0, E: 1})
	require.ErrorIs(t, err, ErrNoSpace)
	require.NoError(t, m.Commit())
	require.LessOrEqual(t, m.Space().MapBytes, limit)
	require.Positive(t, m.Space().MapReads)
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())

	// Every key reads its chunk, from a map read whole.
	m, err = Open(dev, Options{ReadOnly: true, MapBytes: 1 << 20})
	require.NoError(t, err)
	defer m.Close()
	require.Zero(t, m.Space().MapPagedOut)
	require.EqualValues(t, chunks, m.Space().ChunksUsed)
	for c, loc := range locOf {
		l, ok, err := m.Get(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, loc, l)
	}
	require.NoError(t, m.Check())
}

// TestPagedMapConcurrent: writers that take data chunks in order
// (PutData) and at random (MarkData), and delete and free them, beside a
// committer, readers of DataInUse and Space, and ReadMapAhead, on a data
// map of four pages kept to one block, with background write-back. Then Check passes
// and every writer's keys read back.
func TestPagedMapConcurrent(t *testing.T) {
	const chunks = 4 * bitsPerPage
	dev, err := blockdev.NewMem(2048*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: chunks, MapBytes: 1, CacheBytes: 64 << 10})
	require.NoError(t, err)
	defer m.Close()
	seed := blockdevtest.Seed(t)
	steps := 3000
	if testing.Short() {
		steps = 1000
	}
	var g errgroup.Group
	stop := make(chan struct{})
	models := make([]map[Key]uint64, 3)
	for w := range models {
		models[w] = map[Key]uint64{}
		g.Go(func() error {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			md := models[w]
			for i := range steps {
				k := Key{B: uint32(w + 1), C: rng.Uint64N(2000), E: 1}
				if loc, ok := md[k]; ok {
					if _, err := m.Delete(k); err != nil {
						return err
					}
					if err := m.FreeData(loc); err != nil {
						return err
					}
					delete(md, k)
					continue
				}
				if i%2 == 0 {
					loc, err := m.PutData(k)
					if err != nil {
						return err
					}
					md[k] = loc
					continue
				}
				loc := rng.Uint64N(chunks)
				if err := m.MarkData(loc); errors.Is(err, ErrInvalid) {
					continue // in use or held
				} else if err != nil {
					return err
				}
				if err := m.Put(k, loc); err != nil {
					return err
				}
				md[k] = loc
			}
			return nil
		})
	}
	var bg errgroup.Group
	until := func(f func() error) { // f over and over until stop
		bg.Go(func() error {
			for {
				select {
				case <-stop:
					return nil
				default:
				}
				if err := f(); err != nil {
					return err
				}
			}
		})
	}
	until(m.Commit)
	until(func() error {
		_ = m.Space()
		return m.DataInUse(func(uint64) bool { return true })
	})
	ahead := rand.New(rand.NewPCG(seed, 99))
	until(func() error { // as a delete's batch does before its frees
		m.ReadMapAhead([]uint64{ahead.Uint64N(chunks), ahead.Uint64N(chunks), ahead.Uint64N(chunks)})
		return nil
	})
	require.NoError(t, g.Wait())
	close(stop)
	require.NoError(t, bg.Wait())
	require.NoError(t, m.Commit())
	require.Positive(t, m.Space().MapReads)
	require.NoError(t, m.Check())
	for _, md := range models {
		for k, loc := range md {
			l, ok, err := m.Get(k)
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, loc, l)
		}
	}
}

// TestHeldSparse: held bits at random over two pages, against a model,
// through a page's sparse words, its change to a block past heldSparse
// words, and its drop when it holds nothing; heldMem follows the pages'
// cost, and a sparse page costs far less than a block.
func TestHeldSparse(t *testing.T) {
	const nbits = 2 * bitsPerPage
	rng := rand.New(rand.NewPCG(3, 4))
	s, model := newSpaceMap(nbits), map[uint64]bool{}
	check := func(step int) {
		t.Helper()
		for i := range uint64(nbits) {
			if s.isHeld(i) != model[i] {
				t.Fatalf("step %d: bit %d held %v, want %v", step, i, s.isHeld(i), model[i])
			}
		}
		require.EqualValues(t, len(model), s.nheld, "step %d", step)
		mem, pages := uint64(0), 0
		for pi, p := range s.held {
			n := 0
			for i := range model {
				if i/bitsPerPage == uint64(pi) {
					n++
				}
			}
			if n == 0 {
				require.Nil(t, p, "step %d page %d: holds nothing", step, pi)
				continue
			}
			require.EqualValues(t, n, p.n, "step %d page %d", step, pi)
			mem += p.cost()
			pages++
		}
		require.Equal(t, mem, s.heldMem, "step %d", step)
		require.Equal(t, pages, s.nheldP, "step %d", step)
	}
	blocks := 0
	for step := range 60 {
		switch {
		case step%20 < 12: // hold some
			for range rng.IntN(400) {
				i := rng.Uint64N(nbits)
				if !model[i] {
					s.hold(i)
					model[i] = true
				}
			}
		default: // release some, or all
			for i := range model {
				if step%20 == 19 || rng.IntN(2) == 0 {
					s.unhold(i)
					delete(model, i)
				}
			}
		}
		check(step)
		for _, p := range s.held {
			if p != nil && p.w != nil {
				blocks++
			}
		}
	}
	require.Positive(t, blocks, "no page became a block")
	s.hold(7)
	require.Less(t, s.memBytes(), uint64(200), "one held bit costs a sparse page, not a block")
}

// TestReadMapAhead: ReadMapAhead brings paged-out pages of the data map
// back without mu held across its reads, at most half the limit of them;
// the frees that follow read nothing under mu. A read that fails leaves
// the page paged out, for the change that needs it to read and report.
func TestReadMapAhead(t *testing.T) {
	const chunks = 8 * bitsPerPage
	mem, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	dev := blockdevtest.NewFaulty(mem)
	m, err := Format(dev, Options{DataChunks: chunks, MapBytes: 4 * len(bitPage{}) * 8, SyncWriteBack: true})
	require.NoError(t, err)
	defer m.Close()
	for c := range uint64(chunks) {
		_, err := m.PutData(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
	}
	for c := uint64(0); c < chunks; c += 3 { // every page partly used
		loc, err := m.Delete(Key{B: 1, C: c, E: 1})
		require.NoError(t, err)
		require.NoError(t, m.FreeData(loc))
	}
	require.NoError(t, m.Commit())
	m.ReleaseFrees()
	// The paged-out pages, and a chunk in use in each.
	var out []uint64
	m.mu.RLock()
	for pi, p := range m.dataSM.words {
		if p == nil {
			out = append(out, uint64(pi))
		}
	}
	m.mu.RUnlock()
	require.GreaterOrEqual(t, len(out), 4)
	inUse := func(pi uint64) uint64 { // chunk c holds key c: in use unless 0 mod 3
		loc := pi * bitsPerPage
		for loc%3 == 0 {
			loc++
		}
		return loc
	}
	locs := []uint64{inUse(out[0]), inUse(out[0]) + 3, inUse(out[1]), inUse(out[2]), inUse(out[3])}

	// A read error: nothing brought back.
	reads := m.Space().MapReads
	dev.FailNth(blockdevtest.OpRead, dev.Count(blockdevtest.OpRead)+1, errors.New("injected"))
	dev.FailNth(blockdevtest.OpRead, dev.Count(blockdevtest.OpRead)+2, errors.New("injected"))
	m.ReadMapAhead(locs)
	dev.Clear()
	require.Equal(t, reads, m.Space().MapReads)

	m.ResetStalls()
	m.ReadMapAhead(locs)
	require.Equal(t, reads+2, m.Space().MapReads, "half the limit: two pages")
	require.Zero(t, m.Stalls().LockedReads)
	free := func(loc uint64) {
		l, err := m.Delete(Key{B: 1, C: loc, E: 1})
		require.NoError(t, err)
		require.Equal(t, loc, l)
		require.NoError(t, m.FreeData(loc))
	}
	before := dev.Count(blockdevtest.OpRead)
	for _, loc := range locs[:3] { // the two pages read ahead
		free(loc)
	}
	require.Equal(t, before, dev.Count(blockdevtest.OpRead), "a free read a page read ahead")
	require.Zero(t, m.Stalls().LockedReads)
	free(locs[3]) // not read ahead: read under mu
	require.EqualValues(t, 1, m.Stalls().LockedReads)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
}

// TestRestoreBitFails: an undo whose page must be read back and cannot
// be fails the open transaction (a chunk left free could be handed out
// twice); one whose read works changes the bit and fails nothing.
func TestRestoreBitFails(t *testing.T) {
	const chunks = 4 * bitsPerPage
	mem, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	dev := blockdevtest.NewFaulty(mem)
	m, err := Format(dev, Options{DataChunks: chunks, MapBytes: 1, SyncWriteBack: true})
	require.NoError(t, err)
	defer m.Close()
	for pi := range uint64(4) { // every page partly used
		require.NoError(t, m.MarkData(pi*bitsPerPage))
	}
	require.NoError(t, m.Commit())
	m.mu.Lock()
	pi := slices.IndexFunc(m.dataSM.words, func(p *bitPage) bool { return p == nil })
	require.GreaterOrEqual(t, pi, 0, "no page paged out")
	loc := uint64(pi)*bitsPerPage + 9
	dev.FailNth(blockdevtest.OpRead, dev.Count(blockdevtest.OpRead)+1, errors.New("injected"))
	m.restoreBit(loc, true)
	m.mu.Unlock()
	require.ErrorIs(t, m.MarkData(5), ErrFailed)
	dev.Clear()

	m2, err := Open(mem, Options{MapBytes: 1, SyncWriteBack: true})
	require.NoError(t, err)
	defer m2.Close()
	m2.mu.Lock()
	pi = slices.IndexFunc(m2.dataSM.words, func(p *bitPage) bool { return p == nil })
	require.GreaterOrEqual(t, pi, 0)
	loc = uint64(pi)*bitsPerPage + 9
	m2.restoreBit(loc, true)
	set, err := m2.dataSM.isSet(loc)
	m2.mu.Unlock()
	require.NoError(t, err)
	require.True(t, set)
	require.NoError(t, m2.ReturnData(loc))
}
