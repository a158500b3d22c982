package meta

import (
	"sync/atomic"
)

// nodeTable maps page numbers to the cache's nodes. It is changed only
// under cache.mu held exclusively and read with no lock at all, so a
// cache hit writes no memory that other cores read: on many cores, the
// reader count of a lock taken shared for each node of each lookup was a
// cache line every core wrote, and lookups queued on it.
//
// It is an open-addressing hash table with linear probing whose slots are
// atomic pointers to nodes (the key is the node's loc, which never
// changes). A slot goes from empty to a node, from a node to the
// tombstone (a delete) and from the tombstone to a node (an insert); it
// never goes back to empty. Growing, or sweeping out tombstones, builds a
// new table and publishes it with one atomic store; a lookup that started
// on the old table finishes there and sees the entries as they were
// before (a node evicted since, or not yet inserted), which is what a
// lookup that ran a moment earlier would have seen. Entries plus
// tombstones stay at most three quarters of the slots, so a probe always
// reaches an empty slot and ends.
type nodeTable struct {
	cur  atomic.Pointer[nodeSlots]
	live int // entries, under cache.mu
	used int // entries and tombstones in cur, under cache.mu
}

type nodeSlots struct {
	mask  uint64
	slots []atomic.Pointer[node]
}

// tombstone marks a deleted slot; a probe passes over it.
var tombstone = new(node)

const minTableSlots = 64

func newNodeSlots(n int) *nodeSlots {
	size := minTableSlots
	for size < n {
		size *= 2
	}
	return &nodeSlots{mask: uint64(size - 1), slots: make([]atomic.Pointer[node], size)}
}

// slotOf is where loc's probe starts: page numbers are dense, so they are
// mixed (Fibonacci hashing) for runs of them not to fill runs of slots.
func (t *nodeSlots) slotOf(loc uint64) uint64 { return (loc * 0x9E3779B97F4A7C15 >> 32) & t.mask }

// get returns the node cached at loc, or nil. No lock is needed.
func (nt *nodeTable) get(loc uint64) *node {
	t := nt.cur.Load()
	if t == nil {
		return nil
	}
	for i := t.slotOf(loc); ; i = (i + 1) & t.mask {
		n := t.slots[i].Load()
		if n == nil {
			return nil
		}
		if n != tombstone && n.loc == loc {
			return n
		}
	}
}

// put inserts n, whose loc is not in the table. Under cache.mu held
// exclusively.
func (nt *nodeTable) put(n *node) {
	t := nt.cur.Load()
	if t == nil || (nt.used+1)*4 > len(t.slots)*3 {
		t = nt.rebuild()
	}
	for i := t.slotOf(n.loc); ; i = (i + 1) & t.mask {
		switch t.slots[i].Load() {
		case nil:
			nt.used++
		case tombstone:
		default:
			continue
		}
		t.slots[i].Store(n)
		nt.live++
		return
	}
}

// del removes the node at loc, if any. Under cache.mu held exclusively.
func (nt *nodeTable) del(loc uint64) {
	t := nt.cur.Load()
	if t == nil {
		return
	}
	for i := t.slotOf(loc); ; i = (i + 1) & t.mask {
		n := t.slots[i].Load()
		if n == nil {
			return
		}
		if n != tombstone && n.loc == loc {
			t.slots[i].Store(tombstone)
			nt.live--
			return
		}
	}
}

// rebuild publishes a table holding the live entries in a quarter of its
// slots, and returns it: the next rebuild comes after twice as many
// inserts again, so a table that only churns (each insert matched by an
// eviction) copies its entries once per two live inserts' worth.
func (nt *nodeTable) rebuild() *nodeSlots {
	old := nt.cur.Load()
	t := newNodeSlots(4 * (nt.live + 1))
	if old != nil {
		for i := range old.slots {
			n := old.slots[i].Load()
			if n == nil || n == tombstone {
				continue
			}
			j := t.slotOf(n.loc)
			for t.slots[j].Load() != nil {
				j = (j + 1) & t.mask
			}
			t.slots[j].Store(n)
		}
	}
	nt.used = nt.live
	nt.cur.Store(t)
	return t
}

// len is the number of entries. Under cache.mu (either way).
func (nt *nodeTable) len() int { return nt.live }

// stripedCounter is a counter that many cores add to at once without all
// writing one cache line: each add goes to one of its stripes, chosen by
// a key the caller spreads (a page number), and a read sums them.
type stripedCounter struct {
	stripes [16]struct {
		n atomic.Uint64
		_ [56]byte // a cache line each
	}
}

// add adds n to the stripe key chooses.
func (s *stripedCounter) add(key, n uint64) { s.stripes[key&15].n.Add(n) }

func (s *stripedCounter) load() uint64 {
	var sum uint64
	for i := range s.stripes {
		sum += s.stripes[i].n.Load()
	}
	return sum
}
