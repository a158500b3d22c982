package meta

import (
	"errors"
	"time"
)

// Lookups under the layer's lock shared (Get, Seek, Prev, Ascend,
// AscendEpoch, NextEpoch, Prefetch) read the pages they miss with the
// lock released (docs/metadata.md section 16). A lookup held mu shared
// across each page read before, and a writer waiting for mu exclusively,
// with the store's lock held, waited for that read; so did every reader
// queued behind the writer.
//
// A lookup that misses stops, remembers the pointer, releases mu, reads
// and decodes the page, takes mu shared again and runs from the start with
// the roots of that moment; the node it read is used when the walk
// reaches the same pointer (location and transaction). That is safe
// because a node whose transaction precedes the one open when the read
// began is immutable as long as a pointer to it is reachable: the writer
// shadows it rather than change it, and its page is not reused before the
// transaction that freed it is durable and its frees released, after
// which no pointer to it is reachable. A node of the open transaction may
// be changed in place after it was written back and evicted, and written
// back again to the same page, so a page read with that transaction is
// used only if no write of it was queued since the lock was released
// (openUnwritten), and the transaction is still open; otherwise it is
// read again, still without the lock. Such pages are the common case
// beside a scan: the write-back goroutine cleans the open transaction's
// nodes, and a scan's reads evict them (docs/metadata.md section 24). If
// the page changed under the read (reused: its check fails), the next try
// reads under the lock, where a failure is real corruption; so does a
// lookup that has read maxPending pages without it.

// errMissed stops a lookup at a page to be read without the lock.
var errMissed = errors.New("meta: page to read without the lock")

// maxPending bounds the nodes one lookup reads without the lock before it
// reads the rest under it: enough for both trees' paths (at most 8
// levels each), so that even a cache too small for one path makes
// progress (each try adds one node), while a tree that keeps changing
// under a lookup cannot make it retry for ever.
const maxPending = 16

// missState is a shared reader's state for reading misses unlocked.
type missState struct {
	on      bool // misses stop the walk (else they read under the lock)
	noRead  bool // a miss is returned as *NotCachedError (the *NoRead lookups)
	miss    ptr
	kind    kind
	level   int
	pending [maxPending]*node
	np      int
	tries   int // pages read without the lock (at most maxPending)
	// pins: the walk pins every node it takes into it (PrefetchPin).
	pins *Pins
	// openTx is the open transaction when the first pending node of it
	// was read (0: none), openSince m.openWrites then (openUnwritten).
	openTx, openSince uint64
	// held: the walk runs under mu held shared (a lookup of the open
	// transaction, not a view), so a page it reads with on false is read
	// under the lock (lockedReads).
	held bool
	// hits counts the walk's cache hits, added to the cache's count when
	// the reader is put back (putReader).
	hits uint64
}

// loadPinned is load for PrefetchPin: every node the walk takes is pinned
// into ms.pins in the same hold of the cache's lock that finds or adds it,
// so that no add, of this walk or another, evicts it before the caller's
// change: with the cache nearly all dirty or pinned (a tree commit in
// flight), a node added and not yet pinned was evicted by the next add.
func (it *iter) loadPinned(p ptr, k kind, level int) (*node, error) {
	ms := it.ms
	if n := it.m.cache.getPinned(p.loc, ms.pins); n != nil {
		if err := checkCached(n, p, k, level); err != nil {
			return nil, it.m.changedOr(err)
		}
		return n, nil
	}
	if ms.on {
		for _, n := range ms.pending[:ms.np] {
			if n.loc == p.loc && n.tx == p.tx && n.kind == k && (level < 0 || int(n.level) == level) {
				return it.m.cache.addPinned(n, ms.pins), nil
			}
		}
		ms.miss, ms.kind, ms.level = p, k, level
		return nil, errMissed
	}
	it.m.lockedReads.Add(1)
	n, err := it.m.readNode(p, k, level)
	if err != nil {
		return nil, it.m.changedOr(err)
	}
	return it.m.cache.addPinned(n, ms.pins), nil
}

// NotCachedError is returned by the NoRead lookups when the answer needs
// a page that is not cached: the caller releases its own locks, calls
// Load with Key and tries again.
type NotCachedError struct{ Key Key }

func (e *NotCachedError) Error() string { return "meta: lookup needs a page read" }

// load is m.load for an iterator: under a shared reader whose misses are
// read unlocked, a miss stops the walk unless the node was read already.
func (it *iter) load(p ptr, k kind, level int) (*node, error) {
	ms := it.ms
	if ms == &it.m.rd.ms {
		return it.m.loadW(p, k, level) // the writer's own walk
	}
	if ms != nil && ms.pins != nil {
		return it.loadPinned(p, k, level)
	}
	if ms == nil || !ms.on {
		if ms != nil && ms.held {
			return it.m.loadHeld(p, k, level, nil)
		}
		return it.m.load(p, k, level) // a view's walk: no lock of the layer held
	}
	if n := it.m.cache.lookup(p.loc); n != nil {
		ms.hits++
		if err := checkCached(n, p, k, level); err != nil {
			return nil, it.m.changedOr(err)
		}
		return n, nil
	}
	for _, n := range ms.pending[:ms.np] {
		if n.loc == p.loc && n.tx == p.tx && n.kind == k && (level < 0 || int(n.level) == level) {
			return it.m.cache.add(n), nil
		}
	}
	ms.miss, ms.kind, ms.level = p, k, level
	return nil, errMissed
}

// retryMiss ends one try of a lookup. If err is errMissed, it reads the
// page with mu released, takes mu shared again, refreshes r's roots and
// reports true: the caller runs the lookup again. Otherwise it reports
// false and the error to return. Callers hold mu shared.
func (m *Meta) retryMiss(r *reader, err error, q Key) (bool, error) {
	if !errors.Is(err, errMissed) {
		return false, err
	}
	ms := &r.ms
	if ms.noRead {
		return false, &NotCachedError{Key: q}
	}
	if ms.tries == len(ms.pending) {
		ms.on = false // read the rest under the lock
		return true, nil
	}
	ms.tries++
	open, since := m.tx, m.openWrites
	m.mu.RUnlock()
	n, rerr := m.readNode(ms.miss, ms.kind, ms.level)
	m.mu.RLock()
	if m.closed {
		return false, ErrClosed
	}
	r.chunk, r.epoch = m.chunk, m.epoch
	if rerr != nil || n.tx > open {
		ms.on = false // read it again under the lock (see the top)
		return true, nil
	}
	if n.tx == open && ms.openTx == 0 {
		ms.openTx, ms.openSince = open, since
	}
	ms.pending[ms.np] = n
	ms.np++
	if ms.openTx != 0 && !m.openUnwritten(ms) {
		// They may be stale: read them again, while tries last.
		ms.dropOpen()
	}
	return true, nil
}

// dropOpen forgets the pending nodes of ms.openTx.
func (ms *missState) dropOpen() {
	k := 0
	for _, n := range ms.pending[:ms.np] {
		if n.tx != ms.openTx {
			ms.pending[k] = n
			k++
		}
	}
	clear(ms.pending[k:ms.np])
	ms.np, ms.openTx, ms.openSince = k, 0, 0
}

// openUnwritten reports whether the pending nodes of the open
// transaction (ms.openTx) are still what their pages hold: the
// transaction is still open, and no write of one of their pages was
// queued since the first of them was read (ms.openSince). Callers hold
// mu shared.
//
// Such a node was clean and uncached when the lookup missed it, under mu:
// every write of its page had ended, since a node stays dirty, and so
// cached, until its write-back is reaped. Its page changes again only if
// the writer changes the node (in the cache: a miss of the walk then
// finds it there, and never uses the pending copy) and writes it back: a
// write queued, or written by the writer itself, under mu exclusively,
// and recorded in openWriteLocs. A freeze makes the node part of a
// commit that may write its page: the pending copy is then not used
// either.
func (m *Meta) openUnwritten(ms *missState) bool {
	if m.tx != ms.openTx || m.openWrites-ms.openSince > openWriteRing {
		return false
	}
	for w := ms.openSince; w < m.openWrites; w++ {
		loc := m.openWriteLocs[w%openWriteRing]
		for _, n := range ms.pending[:ms.np] {
			if n.tx == ms.openTx && n.loc == loc {
				return false
			}
		}
	}
	return true
}

// readNode reads and decodes the node p points to, without a cache.
func (m *Meta) readNode(p ptr, k kind, level int) (*node, error) {
	bp := m.pool.Get().(*[]byte)
	defer m.pool.Put(bp)
	t0 := time.Now()
	if err := m.readPage(*bp, p.loc); err != nil {
		return nil, err
	}
	m.maxRead.Note(int64(time.Since(t0)))
	n, err := decodeNode(*bp, p.loc, k, p.tx, level)
	if err != nil {
		return nil, m.changedOr(err) // a page a live writer reused, on a read-only Meta
	}
	return n, nil
}

// checkCached reports a cached node that does not match its pointer.
func checkCached(n *node, p ptr, k kind, level int) error {
	if n.tx != p.tx || n.kind != k || level >= 0 && int(n.level) != level {
		return corrupt(p.loc, "cached node (tx %d, kind %d, level %d) does not match its pointer (tx %d)", n.tx, n.kind, n.level, p.tx)
	}
	return nil
}

// next returns the key after k in (branch, chunk, epoch) order; false
// past the last.
func (k Key) next() (Key, bool) {
	switch {
	case k.E < ^uint32(0):
		k.E++
	case k.C < ^uint64(0):
		k.C, k.E = k.C+1, 0
	case k.B < ^uint32(0):
		k.B, k.C, k.E = k.B+1, 0, 0
	default:
		return k, false
	}
	return k, true
}

// readLockShort is readLock for a lookup that reads no page (the NoRead
// lookups, the store's read path): its hold is a walk of cached nodes, so
// it is not timed (lockstat's RLockShort). A timed shared hold adds two
// clock reads and two adds on a counter every core writes, on the same
// cache line as the lock's own reader count. readUnlockShort ends it.
func (m *Meta) readLockShort() (*reader, error) {
	m.mu.RLockShort()
	if m.closed {
		m.mu.RUnlockShort()
		return nil, ErrClosed
	}
	r := m.sharedReader()
	r.ms.noRead = true
	return r, nil
}

func (m *Meta) readUnlockShort(r *reader) {
	m.putReader(r)
	m.mu.RUnlockShort()
}

// GetNoRead is Get that reads no page: a miss returns *NotCachedError.
func (m *Meta) GetNoRead(q Key) (uint64, bool, error) {
	r, err := m.readLockShort()
	if err != nil {
		return 0, false, err
	}
	defer m.readUnlockShort(r)
	loc, ok, err := r.get(q)
	if _, err = m.retryMiss(r, err, q); err != nil {
		return 0, false, err
	}
	return loc, ok, nil
}

// SeekNoRead is Seek that reads no page: a miss returns *NotCachedError.
func (m *Meta) SeekNoRead(q Key) (Key, uint64, bool, error) {
	r, err := m.readLockShort()
	if err != nil {
		return Key{}, 0, false, err
	}
	defer m.readUnlockShort(r)
	k, loc, ok, err := r.seek(q)
	if _, err = m.retryMiss(r, err, q); err != nil {
		return Key{}, 0, false, err
	}
	return k, loc, ok, nil
}

// PrevNoRead is Prev that reads no page: a miss returns *NotCachedError.
// Prev may step to the previous leaf, which Load does not read: a caller
// loads what it missed with Prev itself (with no lock of its own held),
// then tries again.
func (m *Meta) PrevNoRead(q Key) (Key, uint64, bool, error) {
	r, err := m.readLockShort()
	if err != nil {
		return Key{}, 0, false, err
	}
	defer m.readUnlockShort(r)
	k, loc, ok, err := r.prev(q)
	if _, err = m.retryMiss(r, err, q); err != nil {
		return Key{}, 0, false, err
	}
	return k, loc, ok, nil
}

// Load reads into the cache the chunk tree's path to q (what Get, Seek
// and Prev of q walk), reading pages without the lock; for a caller that
// got *NotCachedError.
func (m *Meta) Load(q Key) error {
	r, err := m.readLock()
	if err != nil {
		return err
	}
	defer m.readUnlock(r)
	qr := q.run(0)
	for {
		it := r.iter(chunkTree)
		it.seek(r.chunk, qr)
		if retry, err := m.retryMiss(r, it.err, q); !retry {
			return err
		}
	}
}

// Prefetching reports whether Prefetch is working (a page was read
// within its window): the only time a caller's change is likely to miss.
func (m *Meta) Prefetching() bool { return m.prefetch.Load() > 0 }

// Pins is a caller's set of nodes that PinPaths pinned in the cache,
// kept until Unpin. The caller owns it and reuses it, so pinning
// allocates nothing once it has grown; it is not for concurrent use.
type Pins struct{ nodes []*node }

// Unpin releases every node pinned into p.
func (p *Pins) Unpin() { p.unpinFrom(0) }

func (p *Pins) unpinFrom(mark int) {
	for _, n := range p.nodes[mark:] {
		n.pins.Add(-1)
	}
	clear(p.nodes[mark:])
	p.nodes = p.nodes[:mark]
}

// PinPaths reports whether a Put or Delete of q would find both trees'
// paths to it cached (the paths writablePath shadows and the existence
// check walks, and the siblings a rebalance on them may join: mayJoin),
// and if so pins their nodes into p: eviction passes over
// them until p.Unpin. It reads no page. A caller holding a lock of its
// own checks this under it, and if false unpins, releases its lock,
// prefetches and tries again; if true, the change it makes before Unpin
// reads none of these pages under its lock, whatever the cache admits
// meanwhile: the change's own new nodes (its shadowed copies, added to
// the cache one by one, each evicting) and the pages that views and
// lookups read beside it. Without the pins, the epoch tree's path checked
// cached could be gone by the time the chunk tree's put had shadowed its
// own. On false, p keeps what it held before. A node the check finds
// not matching its pointer reports false (the change meets the error).
func (m *Meta) PinPaths(q Key, p *Pins) bool {
	r, err := m.readLock()
	if err != nil {
		return true // the change meets the error
	}
	defer m.readUnlock(r)
	mark := len(p.nodes)
	qr := q.run(0)
	if !m.cache.pinPath(r.chunk, qr, p) || !m.cache.pinPath(r.epoch, qr, p) {
		p.unpinFrom(mark)
		return false
	}
	return true
}
