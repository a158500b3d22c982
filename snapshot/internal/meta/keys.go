package meta

import (
	"fmt"
	"sync/atomic"
)

// reader answers key queries over one pair of roots: the writer's open
// transaction or a View's committed one.
type reader struct {
	m            *Meta
	chunk, epoch tree
	it           iter
	// stripe is the stripe of the cache's hit count this reader adds
	// to: readers are pooled per processor (sync.Pool), and each has its
	// own, so processors do not share one.
	stripe uint64
	// ms: a shared reader reads its misses without the lock (unlocked.go);
	// the writer's reader and views' readers leave it off.
	ms missState
}

func (r *reader) iter(k kind) *iter {
	r.it = iter{m: r.m, ms: &r.ms, k: k, nodes: r.it.nodes[:0], idx: r.it.idx[:0]}
	return &r.it
}

// seek returns the first key >= q in chunk order.
func (r *reader) seek(q Key) (Key, uint64, bool, error) {
	k := chunkTree
	it := r.iter(k)
	qr := q.run(0)
	if !it.seek(r.chunk, qr) {
		return Key{}, 0, false, it.err
	}
	if it.valid() {
		x := it.run()
		if b := k.before(x, qr); b < uint64(x.n) {
			y := k.at(x, b)
			return Key{y.b, y.c, y.e}, y.loc, true, nil
		}
	}
	if !it.next() {
		return Key{}, 0, false, it.err
	}
	x := it.run()
	return Key{x.b, x.c, x.e}, x.loc, true, nil
}

// prev returns the last key < q in chunk order.
func (r *reader) prev(q Key) (Key, uint64, bool, error) {
	k := chunkTree
	it := r.iter(k)
	qr := q.run(0)
	if !it.seek(r.chunk, qr) {
		return Key{}, 0, false, it.err
	}
	if it.valid() {
		x := it.run()
		if b := k.before(x, qr); b > 0 {
			y := k.at(x, b-1)
			return Key{y.b, y.c, y.e}, y.loc, true, nil
		}
	}
	if !it.prev() {
		return Key{}, 0, false, it.err
	}
	x := k.last(it.run())
	return Key{x.b, x.c, x.e}, x.loc, true, nil
}

// get returns the location of key q, if present.
//
// Only the leaf where q belongs can hold it (the keys of a leaf's runs lie
// between its separator and the next leaf's), so get never steps to the
// next leaf as seek does: a put's or delete's existence check then walks
// exactly the path the change shadows, the path a caller that checked it
// is cached (PinPaths) expects. Stepping read the next leaf under the
// store's lock in about one random put in 370 (a new key past its leaf's
// last run).
func (r *reader) get(q Key) (uint64, bool, error) {
	k := chunkTree
	it := r.iter(k)
	qr := q.run(0)
	if !it.seek(r.chunk, qr) || !it.valid() {
		return 0, false, it.err
	}
	x := it.run()
	b := k.before(x, qr)
	if b >= uint64(x.n) {
		return 0, false, nil
	}
	if y := k.at(x, b); y.b == q.B && y.c == q.C && y.e == q.E {
		return y.loc, true, nil
	}
	return 0, false, nil
}

// ascend calls fn for each key >= from in chunk order until fn is false.
func (r *reader) ascend(from Key, fn func(Key, uint64) bool) error {
	k := chunkTree
	it := r.iter(k)
	qr := from.run(0)
	if !it.seek(r.chunk, qr) {
		return it.err
	}
	b := uint64(0)
	if it.valid() {
		b = k.before(it.run(), qr)
	} else if !it.next() {
		return it.err
	}
	for {
		x := it.run()
		for ; b < uint64(x.n); b++ {
			y := k.at(x, b)
			if !fn(Key{y.b, y.c, y.e}, y.loc) {
				return nil
			}
		}
		b = 0
		if !it.next() {
			return it.err
		}
	}
}

// ascendEpoch calls fn with the chunks of branch b at epoch e, from chunk
// from on, in chunk order, until fn is false. It reads only the epoch
// tree; Get gives a key's location.
func (r *reader) ascendEpoch(b uint32, e uint32, from uint64, fn func(c uint64) bool) error {
	k := epochTree
	it := r.iter(k)
	qr := run{b: b, e: e, c: from}
	if !it.seek(r.epoch, qr) {
		return it.err
	}
	i := uint64(0)
	if it.valid() {
		i = k.before(it.run(), qr)
	}
	if !it.valid() || i >= uint64(it.run().n) {
		if !it.next() {
			return it.err
		}
		i = 0
	}
	for {
		x := it.run()
		if x.b != b || x.e != e {
			return nil
		}
		for ; i < uint64(x.n); i++ {
			if !fn(x.c + i) {
				return nil
			}
		}
		i = 0
		if !it.next() {
			return it.err
		}
	}
}

// reader returns the writer's reader over the open transaction; its
// iterator buffers are reused, so the writer's own lookups do not
// allocate. Callers hold m.mu exclusively.
func (m *Meta) reader() *reader {
	m.rd.m, m.rd.chunk, m.rd.epoch = m, m.chunk, m.epoch
	return &m.rd
}

// sharedReader returns a reader over the open transaction for a query
// under m.mu shared: many run at once, so each takes its own reader (and
// iterator buffers) from a pool rather than the writer's. Callers hold
// m.mu shared and hand it back with putReader.
func (m *Meta) sharedReader() *reader {
	r, _ := m.readers.Get().(*reader)
	if r == nil {
		r = &reader{stripe: readerStripes.Add(1)}
	}
	r.m, r.chunk, r.epoch = m, m.chunk, m.epoch
	r.ms.on, r.ms.held = true, true
	return r
}

// readerStripes numbers the shared readers made, for their stripes.
var readerStripes atomic.Uint64

// putReader returns r to the pool, keeping no node alive past its
// eviction.
func (m *Meta) putReader(r *reader) {
	if r.ms.hits > 0 {
		m.cache.hits.add(r.stripe, r.ms.hits)
	}
	clear(r.it.nodes[:cap(r.it.nodes)])
	clear(r.ms.pending[:r.ms.np])
	r.ms = missState{}
	m.readers.Put(r)
}

// readLock takes m.mu shared and a reader of the open transaction for a
// lookup: lookups never wait for one another, only for a change.
// readUnlock ends it.
func (m *Meta) readLock() (*reader, error) {
	m.mu.RLock()
	if m.closed {
		m.mu.RUnlock()
		return nil, ErrClosed
	}
	return m.sharedReader(), nil
}

func (m *Meta) readUnlock(r *reader) {
	m.putReader(r)
	m.mu.RUnlock()
}

// nextEpoch returns the smallest epoch >= e with keys in branch b.
func (r *reader) nextEpoch(b, e uint32) (uint32, bool, error) {
	k := epochTree
	it := r.iter(k)
	qr := run{b: b, e: e}
	if !it.seek(r.epoch, qr) {
		return 0, false, it.err
	}
	if !it.valid() || k.before(it.run(), qr) >= uint64(it.run().n) {
		if !it.next() {
			return 0, false, it.err
		}
	}
	if x := it.run(); x.b == b {
		return x.e, true, nil
	}
	return 0, false, nil
}

// Put inserts key q mapped to loc (a data chunk, or a value >= LocSpecial)
// in the open transaction. ErrExists if q is present; ErrNoSpace, with
// nothing changed, if the metadata region cannot take it.
func (m *Meta) Put(q Key, loc uint64) error { return m.putLocking(q, loc, false) }

// PutReserve is Put that may use the delete reserve: for a change that
// Room admitted with isDelete (a record that frees more than it adds, as
// the store's collector's moves do), so that its puts are not refused
// half way through it.
func (m *Meta) PutReserve(q Key, loc uint64) error { return m.putLocking(q, loc, true) }

// lockChange takes mu for a Put, PutData or Delete, and notes the cache's
// misses so far, so that unlockNotify can tell whether the change read a
// page.
func (m *Meta) lockChange() {
	m.mu.Lock()
	m.missMark = m.cache.misses.Load()
	m.wMissMark = m.wMiss
}

// unlockNotify ends a change begun by lockChange: it turns prefetching on
// if the change read a page (see Prefetch), releases mu, then calls the
// low-space callback if the change crossed the threshold (outside mu: the
// callback may call back into the layer).
func (m *Meta) unlockNotify() {
	if m.cache.misses.Load() != m.missMark {
		m.prefetch.Store(prefetchWindow)
	}
	if miss := m.wMiss - m.wMissMark; miss != 0 {
		m.maxChangeMiss.Note(int64(miss))
		m.changesMissed.Add(1)
	}
	cb := m.lowSpace()
	m.mu.Unlock()
	if cb != nil {
		cb()
	}
}

func (m *Meta) putLocking(q Key, loc uint64, reserve bool) error {
	m.lockChange()
	err := m.put(q, loc, reserve)
	m.unlockNotify()
	return err
}

func (m *Meta) put(q Key, loc uint64, reserve bool) error {
	if err := m.usable(); err != nil {
		return err
	}
	if err := m.room(reserve); err != nil {
		return err
	}
	r := m.reader()
	if _, ok, err := r.get(q); err != nil || ok {
		if err == nil {
			err = fmt.Errorf("meta: put %v: %w", q, ErrExists)
		}
		return err
	}
	m.changed = true
	if err := m.putKey(&m.chunk, q.run(loc), r.it.nodes); err != nil {
		return m.fail(err)
	}
	if err := m.putKey(&m.epoch, q.run(0), nil); err != nil {
		return m.fail(err)
	}
	m.keys++
	return m.writeBack()
}

// PutData allocates a data chunk and puts key q mapped to it, in one step
// of the open transaction, so that no commit can separate the allocation
// from the key that references it (which Check would report as a leak).
func (m *Meta) PutData(q Key) (uint64, error) {
	m.lockChange()
	loc, err := m.putData(q)
	m.unlockNotify()
	return loc, err
}

func (m *Meta) putData(q Key) (uint64, error) {
	if err := m.usable(); err != nil {
		return 0, err
	}
	loc, ok, err := m.dataSM.alloc()
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("meta: data space full (%d chunks): %w", m.dataSM.nbits, ErrNoSpace)
	}
	m.changed = true
	if err := m.put(q, loc, false); err != nil {
		m.restoreBit(loc, false) // never referenced by any commit: free at once
		return 0, err
	}
	return loc, nil
}

// Delete removes key q and returns its location.
func (m *Meta) Delete(q Key) (uint64, error) {
	m.lockChange()
	loc, err := m.del(q)
	m.unlockNotify()
	return loc, err
}

func (m *Meta) del(q Key) (uint64, error) {
	if err := m.usable(); err != nil {
		return 0, err
	}
	if err := m.room(true); err != nil {
		return 0, err
	}
	r := m.reader()
	if _, ok, err := r.get(q); err != nil || !ok {
		if err == nil {
			err = fmt.Errorf("meta: delete %v: %w", q, ErrNotFound)
		}
		return 0, err
	}
	m.changed = true
	x, err := m.deleteKey(&m.chunk, q.run(0), r.it.nodes)
	if err != nil {
		return 0, m.fail(err)
	}
	if _, err := m.deleteKey(&m.epoch, q.run(0), nil); err != nil {
		return 0, m.fail(err)
	}
	m.keys--
	return x.loc, m.writeBack()
}

// room checks, before a change, that the worst case of pages it can need
// is free, plus what the commit needs; puts also leave the delete reserve.
// Failing here changes nothing.
func (m *Meta) room(isDelete bool) error { return m.roomFor(1, isDelete) }

// Get returns the location of key q in the open transaction. Get, Seek,
// Prev, Ascend, AscendEpoch and NextEpoch hold the layer's lock shared:
// they run alongside each other and wait only for a change.
func (m *Meta) Get(q Key) (uint64, bool, error) {
	r, err := m.readLock()
	if err != nil {
		return 0, false, err
	}
	defer m.readUnlock(r)
	for {
		loc, ok, err := r.get(q)
		if retry, err := m.retryMiss(r, err, q); !retry {
			return loc, ok && err == nil, err
		}
	}
}

// Seek returns the first key >= q in (branch, chunk, epoch) order.
func (m *Meta) Seek(q Key) (Key, uint64, bool, error) {
	r, err := m.readLock()
	if err != nil {
		return Key{}, 0, false, err
	}
	defer m.readUnlock(r)
	for {
		k, loc, ok, err := r.seek(q)
		if retry, err := m.retryMiss(r, err, q); !retry {
			return k, loc, ok && err == nil, err
		}
	}
}

// Prev returns the last key < q in (branch, chunk, epoch) order.
func (m *Meta) Prev(q Key) (Key, uint64, bool, error) {
	r, err := m.readLock()
	if err != nil {
		return Key{}, 0, false, err
	}
	defer m.readUnlock(r)
	for {
		k, loc, ok, err := r.prev(q)
		if retry, err := m.retryMiss(r, err, q); !retry {
			return k, loc, ok && err == nil, err
		}
	}
}

// Ascend calls fn for the keys >= from in (branch, chunk, epoch) order
// until fn returns false. fn must not call back into m (a change waiting
// for this call would block the nested lookup, and so both).
func (m *Meta) Ascend(from Key, fn func(Key, uint64) bool) error {
	r, err := m.readLock()
	if err != nil {
		return err
	}
	defer m.readUnlock(r)
	// A try stopped by a miss resumes after the last key fn was given.
	start, last, seen := from, Key{}, false
	track := func(k Key, loc uint64) bool { last, seen = k, true; return fn(k, loc) }
	for {
		err := r.ascend(start, track)
		if retry, err := m.retryMiss(r, err, start); !retry {
			return err
		}
		if seen {
			var more bool
			if start, more = last.next(); !more {
				return nil
			}
		}
	}
}

// AscendEpoch calls fn with the chunks of branch b that have a key at
// epoch e, from chunk from, in chunk order, until fn returns false. fn
// must not call back into m.
func (m *Meta) AscendEpoch(b, e uint32, from uint64, fn func(c uint64) bool) error {
	r, err := m.readLock()
	if err != nil {
		return err
	}
	defer m.readUnlock(r)
	// A try stopped by a miss resumes after the last chunk fn was given.
	start, last, seen := from, uint64(0), false
	track := func(c uint64) bool { last, seen = c, true; return fn(c) }
	for {
		err := r.ascendEpoch(b, e, start, track)
		if retry, err := m.retryMiss(r, err, Key{B: b, C: start, E: e}); !retry {
			return err
		}
		if seen {
			if last == ^uint64(0) {
				return nil
			}
			start = last + 1
		}
	}
}

// NextEpoch returns the smallest epoch >= e that has keys in branch b.
func (m *Meta) NextEpoch(b, e uint32) (uint32, bool, error) {
	r, err := m.readLock()
	if err != nil {
		return 0, false, err
	}
	defer m.readUnlock(r)
	for {
		got, ok, err := r.nextEpoch(b, e)
		if retry, err := m.retryMiss(r, err, Key{B: b, E: e}); !retry {
			return got, ok && err == nil, err
		}
	}
}

// Prefetch loads into the cache the nodes that a Put or Delete of key q
// would walk in both trees, under the layer's lock shared, and reports a
// read error. A caller that changes the layer under a lock of its own
// (the store's, which its readers need) prefetches first, so that the
// change, made under that lock, finds its nodes cached and reads no page
// there. It is a hint: the tree may change, or the nodes be evicted,
// before the change, which then reads what it misses as always.
//
// A prefetch walks both trees as the change will again, which doubles the
// cost of a change whose nodes are cached anyway (the copy-on-write of a
// working set that fits the cache: the store's common case). So Prefetch
// works only for prefetchWindow calls after a page was read by a change or
// by a prefetch (or after Open, whose cache is empty), and is a single
// atomic load otherwise: a working set that fits stops prefetching within
// prefetchWindow changes, one that does not keeps it on, and a change
// that misses with it off turns it back on. So does a cache that evicted
// a node since Prefetch last looked while off (two atomic loads): a path
// cached when the window closed may be gone, and the first change to walk
// it read it under the caller's lock; lookups that read pages outside a
// change (a read's loads, the store's preserved-epoch lookups, views)
// evict without turning it on otherwise.
func (m *Meta) Prefetch(q Key) error { return m.PrefetchPin(q, nil) }

// PrefetchPin is Prefetch that also pins into p (if not nil) every node
// it walks, in the same hold of the cache's lock that finds or adds it
// (iter.loadPinned): a node loaded and not yet pinned can be evicted by
// the very next node added when the cache is under pressure (a tree
// commit's frozen nodes, a scan). A walk whose nodes did not all stay
// cached even so is run again, at most maxPinTries times. The caller
// unpins. While prefetching is off it loads and pins nothing.
func (m *Meta) PrefetchPin(q Key, p *Pins) error {
	if m.prefetch.Load() <= 0 {
		ev := m.cache.evicted.Load()
		if ev == m.evictMark.Load() {
			return nil
		}
		m.evictMark.Store(ev)
		m.prefetch.Store(prefetchWindow)
	}
	m.prefetch.Add(-1)
	r, err := m.readLock()
	if err != nil {
		return err
	}
	defer m.readUnlock(r)
	r.ms.pins = p
	misses := m.cache.misses.Load()
	for _, k := range []kind{chunkTree, epochTree} {
		// The path to q, then the siblings a rebalance on it may join
		// (mayJoin): each through the separator that leads to it.
		var seps [maxPending]run
		ns := 0
		for x := -1; x < ns; x++ {
			qr := q.run(0)
			if x >= 0 {
				qr = seps[x]
			}
			for pinTries := 0; ; {
				t := r.chunk
				if k == epochTree {
					t = r.epoch
				}
				it := r.iter(k)
				it.seek(t, qr)
				retry, err := m.retryMiss(r, it.err, q)
				if err != nil {
					return err
				}
				if retry {
					continue
				}
				if p != nil && it.err == nil && !m.cache.pinNodes(it.nodes, p) && pinTries < maxPinTries {
					pinTries++
					continue
				}
				if x < 0 && it.err == nil {
					ns = joinSeparators(it, seps[:])
				}
				break
			}
		}
	}
	if m.cache.misses.Load() != misses {
		m.prefetch.Store(prefetchWindow)
	}
	return nil
}

// maxPinTries bounds how many times PrefetchPin walks a path again
// whose nodes were evicted before it pinned them.
const maxPinTries = 3

// prefetchWindow is how many Prefetch calls work after the last page a
// change or a prefetch read.
const prefetchWindow = 1024

// Len returns the number of keys in the open transaction.
func (m *Meta) Len() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.keys
}

// Stats describes the trees of the open transaction.
type Stats struct {
	Keys, ChunkRuns, EpochRuns uint64
	ChunkLevels, EpochLevels   int
	Tx                         uint64 // the open transaction
}

// Stats reports key and run counts.
func (m *Meta) Stats() Stats {
	m.mu.RLock()
	defer m.mu.RUnlock()
	lv := func(t tree) int {
		if t.root.isNil() {
			return 0
		}
		return int(t.level) + 1
	}
	return Stats{Keys: m.keys, ChunkRuns: m.chunk.runs, EpochRuns: m.epoch.runs, ChunkLevels: lv(m.chunk), EpochLevels: lv(m.epoch), Tx: m.tx}
}

// View is a read-only snapshot of the last committed transaction. Its
// pages are not reused until Release, and reading it never waits for the
// writer. A View is for one goroutine at a time.
type View struct {
	r        reader
	st       state
	released bool
}

// View returns a read-only snapshot of the last committed transaction.
func (m *Meta) View() *View {
	m.viewMu.Lock()
	defer m.viewMu.Unlock()
	st := m.committed
	m.views[st.tx]++
	return &View{r: reader{m: m, chunk: st.chunk, epoch: st.epoch}, st: st}
}

// Release ends the view; its pages may then be reused.
func (v *View) Release() {
	if v.released {
		return
	}
	v.released = true
	m := v.r.m
	m.viewMu.Lock()
	defer m.viewMu.Unlock()
	if m.views[v.st.tx]--; m.views[v.st.tx] == 0 {
		delete(m.views, v.st.tx)
	}
}

// Pace lets other goroutines run during a long walk of the view, as the
// view's own page loads do (viewPace): for a caller whose work between
// loads is long (a batch of entries it processes).
func (v *View) Pace() { v.r.m.viewPace() }

// Tx is the committed transaction the view reads.
func (v *View) Tx() uint64 { return v.st.tx }

// Len returns the number of keys.
func (v *View) Len() uint64 { return v.st.keys }

// errReleased is returned by a View's reads after Release: its pages may
// have been reused.
var errReleased = fmt.Errorf("meta: view released: %w", ErrClosed)

// Get returns the location of key q.
func (v *View) Get(q Key) (uint64, bool, error) {
	if v.released {
		return 0, false, errReleased
	}
	return v.r.get(q)
}

// Seek returns the first key >= q in (branch, chunk, epoch) order.
func (v *View) Seek(q Key) (Key, uint64, bool, error) {
	if v.released {
		return Key{}, 0, false, errReleased
	}
	return v.r.seek(q)
}

// Prev returns the last key < q in (branch, chunk, epoch) order.
func (v *View) Prev(q Key) (Key, uint64, bool, error) {
	if v.released {
		return Key{}, 0, false, errReleased
	}
	return v.r.prev(q)
}

// Ascend calls fn for the keys >= from until fn returns false.
func (v *View) Ascend(from Key, fn func(Key, uint64) bool) error {
	if v.released {
		return errReleased
	}
	return v.r.ascend(from, fn)
}

// AscendEpoch calls fn with the chunks of (b, e) from chunk from on.
func (v *View) AscendEpoch(b, e uint32, from uint64, fn func(c uint64) bool) error {
	if v.released {
		return errReleased
	}
	return v.r.ascendEpoch(b, e, from, fn)
}

// NextEpoch returns the smallest epoch >= e that has keys in branch b.
func (v *View) NextEpoch(b, e uint32) (uint32, bool, error) {
	if v.released {
		return 0, false, errReleased
	}
	return v.r.nextEpoch(b, e)
}
