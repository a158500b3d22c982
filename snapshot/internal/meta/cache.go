package meta

import (
	"sync"
	"sync/atomic"
)

// nodeOverhead approximates a decoded node's memory beyond its run array.
const nodeOverhead = 200

// cache holds decoded nodes by page number, bounded in bytes. Clean nodes
// are evicted in CLOCK (second-chance) order; dirty nodes (written by the
// current transaction, not yet on disk) stay until the writer writes them
// back. The CLOCK ring holds the clean nodes only: a dirty node is on the
// dirty FIFO instead, and goes back on the ring, at its hot end, when it
// is written and becomes clean. With the dirty nodes on the ring,
// eviction walked past every one of them (they cannot be dropped) on each
// call, and with most of the cache dirty, as in a random fill far past
// the cache, that walk took 30% of the fill's CPU at 55M versions.
//
// A hit takes no lock (nodeTable) and only sets the node's referenced bit,
// so any number of lookups (the writer-side queries under Meta.mu shared,
// and views) run at once; an LRU move on every hit made each lookup take
// mu exclusively, and concurrent readers queued on it, and later a hit's
// shared hold of mu was a cache line every core wrote. Eviction, under mu
// exclusively, walks the ring from its cold end: a referenced node loses
// its bit and goes to the hot end (its second chance), an unreferenced
// clean one is dropped.
type cache struct {
	// mu guards every field below but the atomic counters, and the
	// prev/next/cost/inCache fields of the nodes; it is the innermost lock
	// (Meta.mu -> Meta.viewMu -> cache.mu). Everything that changes the
	// table, the ring or the counts takes it exclusively. Lookups that pin
	// take it shared, so that eviction sees their pins; plain lookups
	// (get) take no lock: nodes is read without one.
	mu    sync.RWMutex
	limit int
	bytes int
	dirty int // bytes of dirty nodes
	nodes nodeTable
	head  node // CLOCK ring sentinel (clean nodes): head.next is the most recently inserted or spared
	dhead node // dirty FIFO sentinel: dhead.dnext is the longest dirty
	// The counters are atomic: counted by lookups under mu shared, by the
	// write-back goroutine, which takes no lock, and by eviction under mu,
	// and read with no lock (Prefetch reads evicted).
	evicted  atomic.Uint64
	hits     stripedCounter // by page number: every lookup counts one per node
	misses   atomic.Uint64
	writeOut atomic.Uint64
	// readAhead counts nodes read by ReadAhead (readahead.go).
	readAhead atomic.Uint64
	// xwait counts the goroutines blocked taking mu exclusively (lock):
	// the writer's changes take it so for each node of their path.
	xwait atomic.Int32
}

// lock takes mu exclusively, counted in xwait while it waits.
func (c *cache) lock() {
	if !c.mu.TryLock() {
		c.xwait.Add(1)
		c.mu.Lock()
		c.xwait.Add(-1)
	}
}

func newCache(limit int) *cache {
	c := &cache{limit: limit}
	c.head.next, c.head.prev = &c.head, &c.head
	c.dhead.dnext, c.dhead.dprev = &c.dhead, &c.dhead
	return c
}

func nodeCost(n *node) int { return nodeOverhead + n.backing()*32 + cap(n.kids)*16 }

func (c *cache) unlink(n *node) {
	n.prev.next, n.next.prev = n.next, n.prev
	n.prev, n.next = nil, nil
}

func (c *cache) pushFront(n *node) {
	n.next, n.prev = c.head.next, &c.head
	c.head.next.prev = n
	c.head.next = n
}

// dirtyLink and dirtyUnlink keep the dirty FIFO in step with n.dirty
// for nodes in the cache.
func (c *cache) dirtyLink(n *node) {
	n.dprev, n.dnext = c.dhead.dprev, &c.dhead
	c.dhead.dprev.dnext = n
	c.dhead.dprev = n
	c.dirty += n.cost
}

func (c *cache) dirtyUnlink(n *node) {
	n.dprev.dnext, n.dnext.dprev = n.dnext, n.dprev
	n.dprev, n.dnext = nil, nil
	c.dirty -= n.cost
}

// get returns the cached node at loc, if any, and marks it referenced. It
// takes no lock: the node may be evicted as soon as it is found (as it
// could be once a lookup under mu released it), which costs its user
// nothing, since a node outside the cache stays as it was (the writer
// changes only dirty nodes, which are never evicted). Eviction may clear
// the bit as this sets it; the node then gets no second chance.
func (c *cache) get(loc uint64) *node {
	n := c.lookup(loc)
	if n != nil {
		c.hits.add(loc, 1)
	}
	return n
}

// lookup is get that leaves the hit for its caller to count: a shared
// reader counts its hits itself and adds them once, when it is put back
// (Meta.putReader), to its own stripe.
func (c *cache) lookup(loc uint64) *node {
	n := c.nodes.get(loc)
	if n == nil {
		c.misses.Add(1)
		return nil
	}
	if !n.ref.Load() { // a load first: no store (no cache-line write) on a hot node
		n.ref.Store(true)
	}
	return n
}

// pinPath pins into p the nodes of t's path to q, root to leaf, and the
// siblings a rebalance along it may load (mayJoin), while each is cached
// and matches its pointer; false at the first that is not (the caller
// unpins what was pinned). Called with Meta.mu held shared, so the tree
// does not change under the walk.
func (c *cache) pinPath(t tree, q run, p *Pins) bool {
	if t.root.isNil() {
		return true
	}
	at, level := t.root, int(t.level)
	var parent *node
	pi := 0
	for {
		n := c.pinAt(at, t.kind, level, p)
		if n == nil {
			return false
		}
		if parent != nil && mayJoin(n) {
			if j := siblingIndex(parent, pi); j >= 0 && c.pinAt(parent.kids[j], t.kind, level, p) == nil {
				return false
			}
		}
		if n.leaf() {
			return true
		}
		parent, pi = n, childIndex(t.kind, n, q)
		at, level = n.kids[pi], int(n.level)-1
	}
}

// getPinned is get that also pins the node into p, under mu shared: a
// node is pinned while it is in the table, and eviction, which takes mu
// exclusively, then sees the pin.
func (c *cache) getPinned(loc uint64, p *Pins) *node {
	c.mu.RLock()
	n := c.nodes.get(loc)
	if n != nil {
		n.pins.Add(1)
		p.nodes = append(p.nodes, n)
		n.ref.Store(true)
	}
	c.mu.RUnlock()
	if n == nil {
		c.misses.Add(1)
		return nil
	}
	c.hits.add(loc, 1)
	return n
}

// addPinned is add that pins the cached node into p before it evicts.
func (c *cache) addPinned(n *node, p *Pins) *node {
	c.lock()
	defer c.mu.Unlock()
	if old := c.nodes.get(n.loc); old != nil {
		n = old
	} else {
		c.insert(n)
	}
	n.pins.Add(1)
	n.ref.Store(true)
	p.nodes = append(p.nodes, n)
	c.evictLocked()
	return n
}

// pinNodes pins into p those of nodes that are cached; false if any is
// not (evicted since the walk that returned it loaded it).
func (c *cache) pinNodes(nodes []*node, p *Pins) bool {
	ok := true
	c.mu.RLock()
	for _, n := range nodes {
		if c.nodes.get(n.loc) != n {
			ok = false
			continue
		}
		n.pins.Add(1)
		n.ref.Store(true)
		p.nodes = append(p.nodes, n)
	}
	c.mu.RUnlock()
	return ok
}

// pinAt pins into p the node at's pointer names, and returns it; nil if
// it is not cached or does not match the pointer. A node is pinned under
// c.mu shared, while it is in the map: eviction, which takes c.mu
// exclusively, then sees the pin.
func (c *cache) pinAt(at ptr, k kind, level int, p *Pins) *node {
	c.mu.RLock()
	n := c.nodes.get(at.loc)
	if n != nil {
		n.pins.Add(1)
		n.ref.Store(true)
	}
	c.mu.RUnlock()
	if n == nil {
		return nil
	}
	p.nodes = append(p.nodes, n)
	if checkCached(n, at, k, level) != nil {
		return nil
	}
	return n
}

// add inserts n unless another node for its page is already cached, and
// returns the cached one. It evicts clean nodes beyond the limit.
func (c *cache) add(n *node) *node {
	c.lock()
	defer c.mu.Unlock()
	if old := c.nodes.get(n.loc); old != nil {
		old.ref.Store(true)
		if old == n {
			c.resize(old)
		}
		return old
	}
	c.insert(n)
	c.evictLocked()
	return n
}

// resize refreshes n's cost after the writer changed it.
func (c *cache) resize(n *node) {
	cost := nodeCost(n)
	c.bytes += cost - n.cost
	if n.dirty {
		c.dirty += cost - n.cost
	}
	n.cost = cost
}

// touched records that the writer changed n (and so made it dirty): it is
// (re)inserted if it was evicted and its cost refreshed.
func (c *cache) touched(n *node) {
	if settled(n) {
		return
	}
	c.lock()
	defer c.mu.Unlock()
	c.touchedLocked(n)
}

// settled reports whether a change to n leaves the cache's books as they
// are: n is dirty and cached, and its cost is current (its arrays did not
// grow). touched and dirtied then take no lock: most of a burst of puts
// lands in leaves it has already dirtied, and taking mu exclusively for
// each node of each put's path made the writer queue behind every lookup
// and view holding it shared (and be woken behind them, package pace).
// The writer reads these fields without mu, under Meta.mu held
// exclusively: only it changes a dirty node, its dirty flag (setDirty is
// always called under Meta.mu) or its cost, and eviction never takes a
// dirty node, so nothing else writes them while n is dirty.
func settled(n *node) bool { return n.dirty && n.inCache && nodeCost(n) == n.cost }

// dirtied is setDirty(n, true) and touched(n) under one lock: the writer
// takes each node of a change's path so.
func (c *cache) dirtied(n *node) {
	if settled(n) {
		return
	}
	c.lock()
	defer c.mu.Unlock()
	c.setDirtyLocked(n, true)
	c.touchedLocked(n)
}

func (c *cache) touchedLocked(n *node) {
	if !n.inCache {
		if old := c.nodes.get(n.loc); old != nil {
			c.remove(old)
		}
		c.insert(n)
		return
	}
	c.resize(n)
}

func (c *cache) insert(n *node) {
	n.inCache = true
	n.cost = nodeCost(n)
	c.bytes += n.cost
	c.nodes.put(n)
	if n.dirty {
		c.dirtyLink(n)
	} else {
		c.pushFront(n)
	}
}

// setDirty changes n's dirty flag and the dirty byte count.
func (c *cache) setDirty(n *node, d bool) {
	c.lock()
	defer c.mu.Unlock()
	c.setDirtyLocked(n, d)
}

func (c *cache) setDirtyLocked(n *node, d bool) {
	if n.dirty == d {
		return
	}
	n.dirty = d
	if n.inCache {
		if d {
			c.unlink(n)
			c.dirtyLink(n)
		} else {
			c.dirtyUnlink(n)
			c.pushFront(n) // written just now: hot
		}
	}
}

// drop forgets the node at loc (its page was freed and may be reused).
func (c *cache) drop(loc uint64) {
	c.lock()
	defer c.mu.Unlock()
	if n := c.nodes.get(loc); n != nil {
		c.remove(n)
	}
}

func (c *cache) remove(n *node) {
	c.nodes.del(n.loc)
	c.bytes -= n.cost
	if n.dirty {
		c.dirtyUnlink(n)
	} else {
		c.unlink(n)
	}
	n.inCache = false
}

// evictLocked drops clean, unpinned nodes from the cold end of the ring
// until the cache fits. The ring turns like a clock face under a fixed
// hand at its cold end: a referenced node loses its bit and goes to the
// hot end (its second chance), and so does a pinned one, until it is
// unpinned (PinPaths); an unreferenced one is dropped. Dirty nodes are not
// on the ring (the cache's comment says why). The walk ends: it spares at
// most twice as many nodes as the cache holds. Without lookups running
// that is never the bound: pinned nodes go round at most once between
// them, and a referenced one is spared at most once, its bit cleared.
// Lookups take no lock (get), so they may set bits again during the walk;
// then the walk may stop with the cache over its limit, and the next add
// goes on from where it stopped. It stops too when the ring is empty (the
// cache over its limit with dirty nodes alone).
func (c *cache) evictLocked() {
	for budget := 2 * c.nodes.len(); c.bytes > c.limit && budget > 0; {
		n := c.head.prev
		switch {
		case n == &c.head: // nothing clean is cached
			return
		case n.pins.Load() > 0:
			budget--
			c.unlink(n)
			c.pushFront(n)
		case n.ref.Load():
			budget--
			n.ref.Store(false)
			c.unlink(n)
			c.pushFront(n)
		default:
			c.remove(n)
			c.evicted.Add(1)
		}
	}
}

// dirtyNodes returns up to max (0: all) dirty nodes, longest dirty first.
func (c *cache) dirtyNodes(max int) []*node {
	c.lock()
	defer c.mu.Unlock()
	var out []*node
	for n := c.dhead.dnext; n != &c.dhead && (max <= 0 || len(out) < max); n = n.dnext {
		out = append(out, n)
	}
	return out
}

// dirtyNodesOf appends to dst up to max dirty nodes of transaction tx,
// longest dirty first, skipping those queued to the write-back goroutine
// (wbBusy, which callers read under Meta.mu). dst is the caller's buffer,
// so write-back does not allocate.
func (c *cache) dirtyNodesOf(dst []*node, tx uint64, max int) []*node {
	c.lock()
	defer c.mu.Unlock()
	for n := c.dhead.dnext; n != &c.dhead && len(dst) < max; n = n.dnext {
		if n.tx == tx && !n.wbBusy {
			dst = append(dst, n)
		}
	}
	return dst
}

// wrote counts nodes written back.
func (c *cache) wrote(n int) { c.writeOut.Add(uint64(n)) }

// costOf sums the cache cost of nodes.
func (c *cache) costOf(nodes []*node) int {
	c.lock()
	defer c.mu.Unlock()
	sum := 0
	for _, n := range nodes {
		sum += n.cost
	}
	return sum
}

func (c *cache) dirtyBytes() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.dirty
}

func (c *cache) evict() {
	c.lock()
	defer c.mu.Unlock()
	c.evictLocked()
}

// CacheStats describes the node cache.
type CacheStats struct {
	Bytes, DirtyBytes, Limit int
	Nodes                    int
	Hits, Misses, Evicted    uint64
	WrittenBack              uint64
	ReadAhead                uint64 // nodes ReadAhead read
}

func (c *cache) stats() CacheStats {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return CacheStats{Bytes: c.bytes, DirtyBytes: c.dirty, Limit: c.limit, Nodes: c.nodes.len(),
		Hits: c.hits.load(), Misses: c.misses.Load(), Evicted: c.evicted.Load(), WrittenBack: c.writeOut.Load(),
		ReadAhead: c.readAhead.Load()}
}
