package meta

import (
	"golang.org/x/sync/errgroup"
)

// Read-ahead: loading, with concurrent page reads, the nodes that a batch
// of changes known in advance will walk.
//
// The store's Open after a crash replays the index changes logged since
// the last tree commit, sorted in key order (tens of thousands of them).
// When the tree is much larger than the cache, nearly every change lands
// in a leaf of its own that is not cached, and applied one after another
// the changes make a chain of synchronous page reads: the device's
// latency times the leaves. The changes' keys are known before any is
// applied, so the pages they need can be read concurrently instead.
//
// A node's pointer is known only once its parent is cached, so ReadAhead
// goes level by level: the root, then the distinct nodes of the next
// level that the keys lead to, read readAheadInFlight at a time, and so on
// down to the leaves; the chunk tree first, then the epoch tree.
//
// What it reads must still be cached when the changes are applied, so it
// reads at most a share of the cache (readAheadShare) per call and tells
// the caller how many of the keys, a prefix, it covered: the caller
// applies those changes, which shadow the nodes read (the copies are dirty
// until written back: as many bytes again), and then calls again with the
// rest. A window never covers less than one key, however small the cache,
// so the caller always makes progress; with a cache smaller than one
// key's paths the nodes may be evicted before use, and the change then
// reads them again itself, as without read-ahead. Read-ahead only ever
// adds clean nodes to the cache, so it cannot change what a lookup
// answers: it only saves the reads.

const (
	// readAheadInFlight bounds the page reads in flight at once: enough
	// to keep a device's queue busy, few enough that a call's goroutines
	// and page buffers stay small.
	readAheadInFlight = 64
	// readAheadSpawn: a batch of fewer nodes is read in the caller, one
	// after another.
	readAheadSpawn = 4
	// readAheadShare: one call reads at most 1/readAheadShare of the
	// cache, so that the nodes read, their dirty shadows and the dirty
	// nodes below the write-back threshold fit together.
	readAheadShare = 4
)

// ReadAhead loads into the node cache the nodes that Puts and Deletes of
// keys (in both trees) will walk, reading missing pages concurrently, and
// returns n, the number of keys (a prefix of keys) whose nodes it loaded:
// the caller applies the changes of keys[:n] before it calls again with
// keys[n:], so that the nodes are used before they are evicted. n is at
// least 1 unless keys is empty or err is not nil. Keys in chunk order
// (branch, chunk, epoch) make windows of neighbouring leaves; any order
// is correct.
//
// It holds the layer's lock shared, as lookups do, and returns only once
// every read it started has ended. A read error (or a page that fails its
// checks) is returned as the lookup would return it; the open transaction
// is not failed, since nothing was changed.
func (m *Meta) ReadAhead(keys []Key) (int, error) {
	if len(keys) == 0 {
		return 0, nil
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return 0, ErrClosed
	}
	// Each tree gets half the call's share, so that the chunk tree's
	// leaves cannot leave the epoch tree room for one key only.
	budget := m.cache.limit / readAheadShare / 2
	if budget < maxNodeCost(0) {
		// A window would be one key, whose nodes the next reads may
		// evict before use: the changes read them as well as it could.
		return len(keys), nil
	}
	ra := readAhead{m: m, seen: make(map[uint64]struct{})}
	end := len(keys)
	for _, t := range [...]tree{m.chunk, m.epoch} {
		ra.budget, ra.used = budget, 0
		var err error
		if end, err = ra.tree(t, keys[:end]); err != nil {
			return 0, err
		}
	}
	m.cache.readAhead.Add(uint64(ra.read))
	return end, nil
}

// readAhead is one ReadAhead call's state.
type readAhead struct {
	m      *Meta
	budget int // cache bytes the call may fill in the tree being read
	used   int // cache bytes of the nodes read so far in that tree
	read   int // nodes read so far (and failed)
	at     []ptr
	todo   []ptr
	loaded []*node
	seen   map[uint64]struct{}
}

// tree reads the nodes of t that keys lead to, level by level, and
// returns how many of keys it covered.
func (ra *readAhead) tree(t tree, keys []Key) (int, error) {
	if t.root.isNil() {
		return len(keys), nil
	}
	at := ra.at[:0]
	for range keys {
		at = append(at, t.root)
	}
	ra.at = at
	end := len(keys)
	for level := int(t.level); ; level-- {
		var err error
		if end, err = ra.level(t.kind, level, at[:end]); err != nil {
			return 0, err
		}
		if level == 0 {
			return end, nil
		}
		// Each key's child: the sorted keys share parents, so load (a
		// cache lookup, or a read if the node was evicted meanwhile) runs
		// once per distinct parent.
		var n *node
		for i := 0; i < end; i++ {
			if n == nil || at[i] != (ptr{n.loc, n.tx}) {
				if n, err = ra.m.loadHeld(at[i], t.kind, level, nil); err != nil {
					return 0, err
				}
			}
			at[i] = n.kids[childIndex(t.kind, n, keys[i].run(0))]
		}
	}
}

// level makes cached and hot the distinct nodes of at (the pointers the
// keys lead to at one level), in key order: those cached are moved to the
// hot end (want), the others are read, in batches of at most
// readAheadInFlight concurrent reads, while the tree's budget lasts. It
// returns how many of the keys have their node there cached: at least
// one, and all of them unless the budget ran out first.
func (ra *readAhead) level(k kind, level int, at []ptr) (int, error) {
	clear(ra.seen)
	todo := ra.todo[:0]
	defer func() { ra.todo = todo[:0] }()
	// A node's cost is known only once it is decoded: the first batch of
	// a level assumes each node costs the most one can, later ones the
	// mean of the level's nodes read so far.
	used, read, limit := 0, 0, 0
	flush := func() error {
		cost, err := ra.batch(k, level, todo)
		ra.used, used = ra.used+cost, used+cost
		ra.read, read = ra.read+len(todo), read+len(todo)
		todo = todo[:0]
		return err
	}
	for i, p := range at {
		if _, dup := ra.seen[p.loc]; dup {
			continue
		}
		ra.seen[p.loc] = struct{}{}
		if ra.m.cache.want(p.loc) {
			continue
		}
		if len(todo) == 0 {
			est := maxNodeCost(level)
			if read > 0 {
				est = max(used/read, 1)
			}
			limit = min(readAheadInFlight, (ra.budget-ra.used)/est)
			if limit <= 0 {
				if i > 0 {
					return i, nil // the keys before i are covered
				}
				limit = 1 // one key's node, whatever the budget
			}
		}
		todo = append(todo, p)
		if len(todo) == limit {
			if err := flush(); err != nil {
				return 0, err
			}
		}
	}
	if len(todo) > 0 {
		if err := flush(); err != nil {
			return 0, err
		}
	}
	return len(at), nil
}

// maxNodeCost bounds the cache cost of a decoded node of a level: a
// branch of maxKids children, or a leaf of runs of the shortest encoding
// (four one-byte fields), with the room a shadow's copy adds.
func maxNodeCost(level int) int {
	if level > 0 {
		return nodeOverhead + (maxKids+2)*32 + (maxKids+1)*16
	}
	return nodeOverhead + (leafCap/4+2)*32
}

// batch reads nodes concurrently into the cache and returns their cost.
func (ra *readAhead) batch(k kind, level int, nodes []ptr) (int, error) {
	loaded := append(ra.loaded[:0], make([]*node, len(nodes))...)
	ra.loaded = loaded
	read := func(i int) error {
		ra.m.lockedReads.Add(1) // under mu shared (ReadAhead)
		n, err := ra.m.readNode(nodes[i], k, level)
		if err != nil {
			return err
		}
		// Referenced before it is cached: add evicts at once, and would
		// take an unreferenced node first (see want).
		n.ref.Store(true)
		loaded[i] = ra.m.cache.add(n)
		return nil
	}
	var err error
	if len(nodes) < readAheadSpawn {
		// A few nodes (a root, the inner nodes of a window): goroutines
		// would add hand-offs, whose wake-ups a loaded machine delays,
		// for little overlap.
		for i := range nodes {
			if err = read(i); err != nil {
				break
			}
		}
	} else {
		var g errgroup.Group
		for i := range nodes {
			g.Go(func() error { return read(i) })
		}
		err = g.Wait()
	}
	cost := 0
	for i, n := range loaded {
		if n != nil {
			cost += nodeCost(n)
		}
		loaded[i] = nil // keep no node alive past its eviction
	}
	return cost, err
}

// want reports whether the node at loc is cached and, if it is, moves it
// to the hot end of the CLOCK ring, referenced, without counting a hit or
// a miss. After a window is applied nearly every node in the cache was
// referenced by it, so eviction spares them all once and then takes them
// in ring order: marking a node is not enough to keep it, it must also be
// hotter than the nodes of earlier windows. Nodes read ahead are inserted
// there (referenced before add, whose eviction would otherwise drop them
// first), and nodes already cached are moved there by want.
func (c *cache) want(loc uint64) bool {
	c.lock()
	defer c.mu.Unlock()
	n := c.nodes.get(loc)
	if n == nil {
		return false
	}
	n.ref.Store(true)
	if !n.dirty { // a dirty node is not on the ring (cache)
		c.unlink(n)
		c.pushFront(n)
	}
	return true
}
