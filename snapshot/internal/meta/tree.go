package meta

import (
	"fmt"
	"math/bits"
	"runtime"
	"slices"
	"time"

	"github.com/blocksnap/blocksnap/snapshot/internal/pace"
)

// Tree invariants (Check verifies them): keys of the runs in a leaf lie in
// [its separator, the next leaf's separator); a branch key is not greater
// than any key below it; runs never overlap and, in the chunk tree, no key
// lies between the first and last key of a run (docs/metadata.md
// section 2).

// load returns the node p points to, from the cache or the device; level
// is the level the parent expects (-1: any, for a root). It is the load
// of a walk that holds no lock of the layer (a View's, Check's), and
// paces it (viewPace).
func (m *Meta) load(p ptr, k kind, level int) (*node, error) {
	defer m.viewPace()
	if n := m.cache.get(p.loc); n != nil {
		if err := checkCached(n, p, k, level); err != nil {
			return nil, m.changedOr(err)
		}
		return n, nil
	}
	return m.loadMiss(p, k, level)
}

// viewPace lets other goroutines run during a long walk of committed
// pages, which is one goroutine busy for up to seconds. It yields at once
// if the writer is blocked on the cache's lock (the walk's release of it
// woke the writer to run next on this processor, where it would wait for
// the walk to block or run out Go's 10 ms time slice: package pace says
// why), and
// otherwise after pace.Slice of walking since the last yield of any walk,
// so that a writer the runtime preempted, or that woke behind a system
// call, finds a processor within about that. The clock is read every
// 32nd load.
func (m *Meta) viewPace() {
	if m.cache.xwait.Load() > 0 {
		runtime.Gosched()
		return
	}
	if m.viewLoads.Add(1)%32 != 0 {
		return
	}
	t := int64(time.Since(paceBase))
	if last := m.viewYield.Load(); t-last >= int64(pace.Slice) && m.viewYield.CompareAndSwap(last, t) {
		runtime.Gosched()
	}
}

// paceBase is the zero of viewPace's clock.
var paceBase = time.Now()

// loadW is load for the writer, under mu held exclusively: it counts the
// pages its change reads (wMiss) for Stalls, apart from the misses of
// lookups and views that run meanwhile.
func (m *Meta) loadW(p ptr, k kind, level int) (*node, error) {
	return m.loadHeld(p, k, level, &m.wMiss)
}

// loadHeld is load for a walk under mu that reads its misses there (the
// writer's; readahead's and a lookup's past its unlocked reads, under mu
// shared): it counts them (lockedReads), and in *wMiss if not nil.
func (m *Meta) loadHeld(p ptr, k kind, level int, wMiss *uint64) (*node, error) {
	if n := m.cache.get(p.loc); n != nil {
		if err := checkCached(n, p, k, level); err != nil {
			return nil, m.changedOr(err)
		}
		return n, nil
	}
	if wMiss != nil {
		*wMiss++
	}
	m.lockedReads.Add(1)
	return m.loadMiss(p, k, level)
}

// loadMiss reads the node p points to and caches it.
func (m *Meta) loadMiss(p ptr, k kind, level int) (*node, error) {
	n, err := m.readNode(p, k, level)
	if err != nil {
		return nil, m.changedOr(err) // a page a live writer reused, on a read-only Meta
	}
	return m.cache.add(n), nil
}

// childIndex is the index of the child whose subtree holds key q: the last
// separator <= q, or 0.
func childIndex(k kind, n *node, q run) int { return max(upperBound(k, n.runs, q)-1, 0) }

// floorIndex is the index of the last run of leaf n starting at or before
// q, or -1.
func floorIndex(k kind, n *node, q run) int { return upperBound(k, n.runs, q) - 1 }

// upperBound is the index of the first of runs whose start key is greater
// than q's, by binary search. Every lookup and change runs it at each
// level, so each tree's order is written out here rather than through
// kind.cmp, whose switch on the kind and three-way result cost a third of
// a cached lookup.
func upperBound(k kind, runs []run, q run) int {
	lo, hi := 0, len(runs)
	if hi > interpolateMin {
		lo, hi = narrow(k, runs, q)
	}
	if k == chunkTree {
		for lo < hi {
			h := int(uint(lo+hi) >> 1)
			r := &runs[h]
			if r.b < q.b || r.b == q.b && (r.c < q.c || r.c == q.c && r.e <= q.e) {
				lo = h + 1
			} else {
				hi = h
			}
		}
		return lo
	}
	for lo < hi {
		h := int(uint(lo+hi) >> 1)
		r := &runs[h]
		if r.b < q.b || r.b == q.b && (r.e < q.e || r.e == q.e && r.c <= q.c) {
			lo = h + 1
		} else {
			hi = h
		}
	}
	return lo
}

// interpolateMin is the fewest runs a node has for upperBound to guess
// where q falls before its binary search.
const interpolateMin = 16

// narrow returns lo <= hi such that every run before lo starts at or
// before q and none from hi on does (upperBound's answer is in [lo, hi]),
// from a guess: where q's chunk falls between the node's first and last
// run's chunks, then probes 1, 2, 4, ... runs away from it. Keys in a leaf
// of a random fill are spread about evenly, so the guess lands a few runs
// from the answer, and the probes stay in a few cache lines, where a
// binary search of a leaf of 250 runs (8 KiB) touches eight lines apart.
// The guess only decides where the probes start: any guess gives the
// same answer, so a node whose keys are not spread evenly (other
// branches, other epochs, a sequential fill) is only searched slower.
func narrow(k kind, runs []run, q run) (lo, hi int) {
	n := len(runs)
	first, last := runs[0].c, runs[n-1].c
	g := 0
	switch {
	case q.c <= first:
	case q.c >= last:
		g = n - 1
	default:
		// (n-1) * (q.c-first) / (last-first), in 128 bits: the high word
		// is below the divisor, since q.c-first < last-first.
		h, l := bits.Mul64(uint64(n-1), q.c-first)
		x, _ := bits.Div64(h, l, last-first)
		g = int(x)
	}
	step := 1
	if atOrBefore(k, &runs[g], &q) {
		lo, hi = g+1, n
		for i := g + 1; i < n; i = lo + step {
			if !atOrBefore(k, &runs[i], &q) {
				hi = i
				break
			}
			lo = i + 1
			step *= 2
		}
		return lo, hi
	}
	lo, hi = 0, g
	for i := g - 1; i >= 0; i = hi - step {
		if atOrBefore(k, &runs[i], &q) {
			lo = i + 1
			break
		}
		hi = i
		step *= 2
	}
	return lo, hi
}

// atOrBefore reports whether run r starts at or before q in k's order.
func atOrBefore(k kind, r, q *run) bool {
	if k == chunkTree {
		return r.b < q.b || r.b == q.b && (r.c < q.c || r.c == q.c && r.e <= q.e)
	}
	return r.b < q.b || r.b == q.b && (r.e < q.e || r.e == q.e && r.c <= q.c)
}

// iter walks a tree's runs in order. It holds nodes, so writers must not
// change the tree while a writer-side iter is in use; views' trees are
// immutable.
type iter struct {
	m     *Meta
	ms    *missState // a shared reader's: misses are read unlocked (unlocked.go)
	k     kind
	nodes []*node
	idx   []int
	err   error
}

// seek positions it at the last run starting at or before q (idx -1 at the
// leaf if none in that leaf). It reports false on an empty tree or error.
func (it *iter) seek(t tree, q run) bool {
	it.nodes, it.idx = it.nodes[:0], it.idx[:0]
	if t.root.isNil() {
		return false
	}
	n, err := it.load(t.root, t.kind, int(t.level))
	for err == nil && !n.leaf() {
		i := childIndex(t.kind, n, q)
		it.nodes, it.idx = append(it.nodes, n), append(it.idx, i)
		n, err = it.load(n.kids[i], t.kind, int(n.level)-1)
	}
	if err != nil {
		it.err = err
		return false
	}
	it.nodes, it.idx = append(it.nodes, n), append(it.idx, floorIndex(t.kind, n, q))
	return true
}

func (it *iter) valid() bool {
	d := len(it.nodes) - 1
	return d >= 0 && it.idx[d] >= 0 && it.idx[d] < len(it.nodes[d].runs)
}

func (it *iter) run() run {
	d := len(it.nodes) - 1
	return it.nodes[d].runs[it.idx[d]]
}

// next moves to the following run; false at the end or on error.
func (it *iter) next() bool { return it.step(1) }

// prev moves to the preceding run; false at the start or on error.
func (it *iter) prev() bool { return it.step(-1) }

func (it *iter) step(dir int) bool {
	d := len(it.nodes) - 1
	if d < 0 {
		return false
	}
	it.idx[d] += dir
	if it.idx[d] >= 0 && it.idx[d] < len(it.nodes[d].runs) {
		return true
	}
	// climb to a branch with a sibling in that direction
	for d > 0 {
		d--
		it.idx[d] += dir
		if it.idx[d] >= 0 && it.idx[d] < len(it.nodes[d].kids) {
			break
		}
		if d == 0 {
			it.idx[len(it.idx)-1] = -2 // invalid
			return false
		}
	}
	if d == 0 && len(it.nodes) == 1 {
		return false
	}
	for ; d < len(it.nodes)-1; d++ {
		n := it.nodes[d]
		c, err := it.load(n.kids[it.idx[d]], it.k, int(n.level)-1)
		if err != nil {
			it.err = err
			it.idx[len(it.idx)-1] = -2
			return false
		}
		it.nodes[d+1] = c
		if dir > 0 {
			it.idx[d+1] = 0
		} else {
			it.idx[d+1] = len(c.runs) - 1
		}
	}
	return true
}

// shadow returns n writable in the open transaction: n itself if this
// transaction already owns it, else a copy on a newly allocated page
// (the old page is freed, deferred).
func (m *Meta) shadow(n *node) (*node, error) {
	if n.tx == m.tx {
		return n, nil
	}
	loc, err := m.allocPage()
	if err != nil {
		return nil, err
	}
	c := &node{loc: loc, tx: m.tx, kind: n.kind, level: n.level, size: n.size, dirty: true}
	if l := len(n.runs); n.leaf() && l >= minShift {
		// The leaf is shadowed to change: give it the room at each end
		// that insertRun would reallocate it with, so that a change does
		// not allocate it twice (each copy is garbage, and garbage
		// between collections is what leaves the heap's spans part
		// empty: docs/metadata.md section 22).
		h := l / 8
		c.base = make([]run, h+l+h)
		c.runs = c.base[h : h+l]
		copy(c.runs, n.runs)
	} else {
		c.runs = append(make([]run, 0, len(n.runs)+2), n.runs...)
	}
	if !n.leaf() {
		c.kids = append(make([]ptr, 0, len(n.kids)+1), n.kids...)
	}
	m.freePage(n.loc)
	if c.leaf() {
		m.txLeaves.Add(1) // an old leaf a replay reads, copies and writes again
	}
	return m.cache.add(c), nil
}

// own is shadow plus marking the node dirty: a node of this transaction
// that was written back becomes dirty again when it is to change.
func (m *Meta) own(n *node) (*node, error) {
	n, err := m.shadow(n)
	if err != nil {
		return nil, err
	}
	n.gen++ // tells write-back the node changed after it was encoded
	m.cache.dirtied(n)
	return n, nil
}

// writablePath shadows the path from t's root to the leaf where key q
// belongs and returns it (root first) with the child index taken at each
// branch. Separators on the leftmost path are lowered to q when q is below
// them, so that q may be inserted in that leaf.
//
// hint is the path (root first) that the change's existence check just
// walked to q, or nil: a node of it that is the one a pointer on the way
// names is taken as it is, rather than looked up in the cache again.
func (m *Meta) writablePath(t *tree, q run, hint []*node) ([]*node, []int, error) {
	path, idx := m.pathBuf[:0], m.idxBuf[:0]
	n, err := m.loadHint(hint, 0, t.root, t.kind, int(t.level))
	if err == nil {
		n, err = m.own(n)
	}
	if err != nil {
		return nil, nil, err
	}
	t.root = ptr{loc: n.loc, tx: m.tx}
	for !n.leaf() {
		i := childIndex(t.kind, n, q)
		if i == 0 && t.kind.cmp(q, n.runs[0]) < 0 {
			n.runs[0] = run{b: q.b, c: q.c, e: q.e}
		}
		c, err := m.loadHint(hint, len(path)+1, n.kids[i], t.kind, int(n.level)-1)
		if err == nil {
			c, err = m.own(c)
		}
		if err != nil {
			return nil, nil, err
		}
		n.kids[i] = ptr{loc: c.loc, tx: m.tx}
		path, idx = append(path, n), append(idx, i)
		n = c
	}
	path, idx = append(path, n), append(idx, -1)
	m.pathBuf, m.idxBuf = path, idx
	return path, idx, nil
}

// loadHint is load, but returns hint[d] when it is the node p points to
// (the iterator that walked there may have gone on to a neighbour, whose
// path differs below some depth: the check tells).
func (m *Meta) loadHint(hint []*node, d int, p ptr, k kind, level int) (*node, error) {
	if d < len(hint) {
		if h := hint[d]; h != nil && h.loc == p.loc && h.tx == p.tx && h.kind == k && int(h.level) == level {
			return h, nil
		}
	}
	return m.loadW(p, k, level)
}

// replace puts repl in place of leaf runs [i, j), keeping the encoded
// size and the tree's run count current.
func (m *Meta) replace(t *tree, leaf *node, i, j int, repl ...run) {
	k := t.kind
	prevOf := func(x int) run {
		if x == 0 {
			return run{}
		}
		return leaf.runs[x-1]
	}
	for x := i; x <= j && x < len(leaf.runs); x++ {
		leaf.size -= k.encLen(prevOf(x), leaf.runs[x])
	}
	switch {
	case j == i && len(repl) == 1:
		insertRun(leaf, i, repl[0])
	case j == i+1 && len(repl) == 0:
		deleteRun(leaf, i)
	default:
		if len(leaf.runs)-(j-i)+len(repl) > cap(leaf.runs) {
			leaf.base = nil // Replace reallocates
		}
		leaf.runs = slices.Replace(leaf.runs, i, j, repl...)
	}
	for x := i; x <= i+len(repl) && x < len(leaf.runs); x++ {
		leaf.size += k.encLen(prevOf(x), leaf.runs[x])
	}
	t.runs += uint64(len(repl)) - uint64(j-i)
}

// fix restores node sizes along path after its leaf changed: an empty
// node leaves its parent, a full one splits, and a root with one child
// gives way to it.
func (m *Meta) fix(t *tree, path []*node, idx []int) error {
	for d := len(path) - 1; d >= 0; d-- {
		n := path[d]
		if len(n.runs) == 0 {
			m.freePage(n.loc)
			if d == 0 {
				t.root, t.level = ptr{}, 0
				return nil
			}
			p, i := path[d-1], idx[d-1]
			p.runs = slices.Delete(p.runs, i, i+1)
			p.kids = slices.Delete(p.kids, i, i+1)
			continue
		}
		if n.leaf() && n.size > leafCap || !n.leaf() && len(n.runs) > maxKids {
			r, err := m.split(t, n)
			if err != nil {
				return err
			}
			if d == 0 {
				loc, err := m.allocPage()
				if err != nil {
					return err
				}
				root := &node{loc: loc, tx: m.tx, kind: t.kind, level: n.level + 1, dirty: true,
					runs: []run{n.runs[0], r.runs[0]}, kids: []ptr{{n.loc, m.tx}, {r.loc, m.tx}}}
				root.runs[0].n, root.runs[0].loc = 0, 0
				root.runs[1].n, root.runs[1].loc = 0, 0
				m.cache.add(root)
				t.root, t.level = ptr{loc, m.tx}, root.level
				return nil
			}
			p, i := path[d-1], idx[d-1]
			key := r.runs[0]
			key.n, key.loc = 0, 0
			p.runs = slices.Insert(p.runs, i+1, key)
			p.kids = slices.Insert(p.kids, i+1, ptr{r.loc, m.tx})
			m.cache.touched(n)
			continue
		}
		if d > 0 && underfull(n) {
			if err := m.rebalance(t, path[d-1], idx[d-1], n); err != nil {
				return err
			}
			continue
		}
		m.cache.touched(n)
		if d == 0 && !n.leaf() && len(n.kids) == 1 {
			m.freePage(n.loc)
			t.root, t.level = n.kids[0], n.level-1
		}
	}
	return nil
}

// siblingIndex is the child of p that rebalance joins child i with: the
// next one, or the previous one for the last; -1 if p has one child.
func siblingIndex(p *node, i int) int {
	if i+1 < len(p.kids) {
		return i + 1
	}
	return i - 1
}

// joinSlack bounds how much one change can shrink a leaf's encoded size:
// a run removed, and the run after it coded against another (five
// varints of at most 10 bytes each, twice), with room to spare.
const joinSlack = 128

// mayJoin reports whether one change below n (a put, a delete, a child
// joined or split below) could leave n underfull, so that fix would load
// its sibling to rebalance it: Prefetch loads that sibling too, and
// PinPaths pins it, so that the change reads no page of it under the
// caller's lock.
func mayJoin(n *node) bool {
	if n.leaf() {
		return n.size < leafCap/4+joinSlack
	}
	return len(n.kids) <= maxKids/4
}

// joinSeparators fills seps with the separators that lead to the
// siblings a rebalance along its path may load (mayJoin, siblingIndex),
// root first, and returns how many.
func joinSeparators(it *iter, seps []run) int {
	ns := 0
	for d := 1; d < len(it.nodes) && ns < len(seps); d++ {
		if !mayJoin(it.nodes[d]) {
			continue
		}
		p := it.nodes[d-1]
		if j := siblingIndex(p, it.idx[d-1]); j >= 0 {
			seps[ns] = p.runs[j]
			ns++
		}
	}
	return ns
}

// underfull reports a node below a quarter of its capacity.
func underfull(n *node) bool {
	if n.leaf() {
		return n.size < leafCap/4
	}
	return len(n.kids) < maxKids/4
}

// halfIndex is where to split runs so both halves hold about half the
// encoded bytes (leaves) or half the children (branches); in [1, len).
func halfIndex(n *node) int {
	if !n.leaf() {
		return len(n.runs) / 2
	}
	total, acc, prev := n.kind.leafSize(n.runs), 0, run{}
	for i, r := range n.runs {
		acc += n.kind.encLen(prev, r)
		prev = r
		if acc*2 >= total {
			return min(max(i+1, 1), len(n.runs)-1)
		}
	}
	return len(n.runs) / 2
}

// rebalance joins n, child i of p, which is underfull, with a sibling:
// into one node if both fit, else into two halves.
func (m *Meta) rebalance(t *tree, p *node, i int, n *node) error {
	j := siblingIndex(p, i)
	if j < 0 {
		m.cache.touched(n)
		return nil
	}
	sib, err := m.loadW(p.kids[j], t.kind, int(p.level)-1)
	if err == nil {
		sib, err = m.own(sib)
	}
	if err != nil {
		return err
	}
	p.kids[j] = ptr{sib.loc, m.tx}
	hi := max(i, j)
	a, b := n, sib
	if j < i {
		a, b = sib, n
	}
	if len(a.runs)+len(b.runs) > cap(a.runs) {
		a.base = nil // the append reallocates
	}
	a.runs = append(a.runs, b.runs...)
	a.kids = append(a.kids, b.kids...)
	if a.leaf() {
		a.size = t.kind.leafSize(a.runs)
	}
	if a.leaf() && a.size <= leafCap || !a.leaf() && len(a.kids) <= maxKids {
		m.freePage(b.loc)
		p.runs = slices.Delete(p.runs, hi, hi+1)
		p.kids = slices.Delete(p.kids, hi, hi+1)
		m.cache.touched(a)
		return nil
	}
	h := halfIndex(a)
	if len(a.runs)-h > cap(b.runs) {
		b.base = nil // the append reallocates
	}
	b.runs = append(b.runs[:0], a.runs[h:]...)
	a.runs = a.runs[:h]
	if !a.leaf() {
		b.kids = append(b.kids[:0], a.kids[h:]...)
		a.kids = a.kids[:h]
	} else {
		a.size, b.size = t.kind.leafSize(a.runs), t.kind.leafSize(b.runs)
	}
	key := b.runs[0]
	key.n, key.loc = 0, 0
	p.runs[hi] = key
	m.cache.touched(a)
	m.cache.touched(b)
	return nil
}

// split moves the upper half of n to a new node and returns it.
func (m *Meta) split(t *tree, n *node) (*node, error) {
	loc, err := m.allocPage()
	if err != nil {
		return nil, err
	}
	h := halfIndex(n)
	r := &node{loc: loc, tx: m.tx, kind: t.kind, level: n.level, dirty: true,
		runs: append(make([]run, 0, len(n.runs)-h+2), n.runs[h:]...)}
	n.runs = n.runs[:h:h]
	n.runs = append(make([]run, 0, h+2), n.runs...)
	n.base = nil
	if !n.leaf() {
		r.kids = append(make([]ptr, 0, len(n.kids)-h+1), n.kids[h:]...)
		n.kids = append(make([]ptr, 0, h+1), n.kids[:h]...)
	} else {
		n.size, r.size = t.kind.leafSize(n.runs), t.kind.leafSize(r.runs)
		m.txLeaves.Add(1) // a new leaf a replay writes again
	}
	m.cache.touched(n)
	m.cache.add(r)
	return r, nil
}

// putKey inserts key q (a run of one) into t; ErrExists if present. hint
// is as for writablePath.
func (m *Meta) putKey(t *tree, q run, hint []*node) error {
	k := t.kind
	if t.root.isNil() {
		loc, err := m.allocPage()
		if err != nil {
			return err
		}
		n := &node{loc: loc, tx: m.tx, kind: k, dirty: true, runs: make([]run, 0, 8)}
		m.txLeaves.Add(1)
		m.cache.add(n)
		t.root, t.level = ptr{loc, m.tx}, 0
		m.replace(t, n, 0, 0, q)
		m.cache.touched(n)
		return nil
	}
	path, idx, err := m.writablePath(t, q, hint)
	if err != nil {
		return err
	}
	leaf := path[len(path)-1]
	i := floorIndex(k, leaf, q)
	p := i + 1 // where q goes
	if i >= 0 {
		r := leaf.runs[i]
		if k.contains(r, q) {
			return fmt.Errorf("meta: put %v: %w", q, ErrExists)
		}
		if b := k.before(r, q); b < uint64(r.n) {
			m.replace(t, leaf, i, i+1, k.slice(r, 0, b), q, k.slice(r, b, uint64(r.n)))
			return m.fix(t, path, idx)
		}
	}
	// Merged with its neighbours before it goes in, so that a put that
	// extends a run (keys arriving in order) changes that run in place
	// rather than inserting and then deleting.
	x, j := q, p // x replaces runs [i, j)
	if p < len(leaf.runs) && k.mergeable(q, leaf.runs[p]) {
		x.n += leaf.runs[p].n
		j = p + 1
	}
	i = p
	if p > 0 && k.mergeable(leaf.runs[p-1], x) {
		y := leaf.runs[p-1]
		y.n += x.n
		x, i = y, p-1
	}
	m.replace(t, leaf, i, j, x)
	return m.fix(t, path, idx)
}

// deleteKey removes key q from t and returns it (with its loc). hint is
// as for writablePath.
func (m *Meta) deleteKey(t *tree, q run, hint []*node) (run, error) {
	k := t.kind
	if t.root.isNil() {
		return run{}, fmt.Errorf("meta: delete %v: %w", q, ErrNotFound)
	}
	path, idx, err := m.writablePath(t, q, hint)
	if err != nil {
		return run{}, err
	}
	leaf := path[len(path)-1]
	i := floorIndex(k, leaf, q)
	if i < 0 || !k.contains(leaf.runs[i], q) {
		return run{}, fmt.Errorf("meta: delete %v: %w", q, ErrNotFound)
	}
	r := leaf.runs[i]
	b := k.before(r, q)
	got := k.at(r, b)
	var repl []run
	if b > 0 {
		repl = append(repl, k.slice(r, 0, b))
	}
	if b+1 < uint64(r.n) {
		repl = append(repl, k.slice(r, b+1, uint64(r.n)))
	}
	m.replace(t, leaf, i, i+1, repl...)
	return got, m.fix(t, path, idx)
}

func (r run) String() string {
	return fmt.Sprintf("(b%d c%d e%d n%d loc%d)", r.b, r.c, r.e, r.n, r.loc)
}
