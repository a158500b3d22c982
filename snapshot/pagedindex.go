package snapshot

import (
	"errors"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// pagedIndex is the store's index on the paged metadata layer
// (snapshot/internal/meta, docs/metadata.md): entries keyed (branch,
// chunk, epoch) on the store device behind a bounded cache. Its methods
// return errors, because a page read can fail. It is changed only with
// Store.mu held exclusively; the layer's own lock makes each call atomic.
//
// locZero and locInherit are above meta.LocSpecial, so the layer stores
// them as they are and never merges them into runs.
//
// Its reads go through r when set: a committed meta.View that a reader
// walks without the store's lock (readView); such an index is read-only.
type pagedIndex struct {
	m *meta.Meta
	r treeReader
	// reserve: puts may use the layer's delete reserve (set under
	// Store.mu while a record that Room admitted on it is applied, and
	// while Open replays records the store once accepted).
	reserve bool
	// noRead: get, seek and prev read no page; a miss returns
	// *meta.NotCachedError (a read's resolution under Store.mu shared, a
	// preserved-epoch lookup under it exclusively: neither must hold a
	// writer up for a page read).
	noRead bool
}

// treeReader is the read side of the layer, which both the live layer
// (*meta.Meta) and a committed view (*meta.View) offer.
type treeReader interface {
	Get(q meta.Key) (uint64, bool, error)
	Seek(q meta.Key) (meta.Key, uint64, bool, error)
	Prev(q meta.Key) (meta.Key, uint64, bool, error)
	Ascend(from meta.Key, fn func(meta.Key, uint64) bool) error
	AscendEpoch(b, e uint32, from uint64, fn func(c uint64) bool) error
	NextEpoch(b, e uint32) (uint32, bool, error)
	Len() uint64
}

// rd is what the index reads: the view, or else the live layer.
func (p pagedIndex) rd() treeReader {
	if p.r != nil {
		return p.r
	}
	return p.m
}

func metaKey(b uint32, c uint64, e uint32) meta.Key { return meta.Key{B: b, C: c, E: e} }

func entryOf(k meta.Key, loc uint64) entry { return entry{b: k.B, c: k.C, e: k.E, loc: loc} }

// put inserts x; false if (b, c, e) is already present.
func (p pagedIndex) put(x entry) (bool, error) {
	put := p.m.Put
	if p.reserve {
		put = p.m.PutReserve
	}
	err := put(metaKey(x.b, x.c, x.e), x.loc)
	if errors.Is(err, meta.ErrExists) {
		return false, nil
	}
	return err == nil, err
}

// del removes (b, c, e) and returns the removed entry.
func (p pagedIndex) del(b uint32, c uint64, e uint32) (entry, bool, error) {
	loc, err := p.m.Delete(metaKey(b, c, e))
	if errors.Is(err, meta.ErrNotFound) {
		return entry{}, false, nil
	}
	if err != nil {
		return entry{}, false, err
	}
	return entry{b: b, c: c, e: e, loc: loc}, true, nil
}

// get returns the entry exactly at (b, c, e).
func (p pagedIndex) get(b uint32, c uint64, e uint32) (entry, bool, error) {
	var loc uint64
	var ok bool
	var err error
	if p.noRead && p.r == nil {
		loc, ok, err = p.m.GetNoRead(metaKey(b, c, e))
	} else {
		loc, ok, err = p.rd().Get(metaKey(b, c, e))
	}
	if err != nil || !ok {
		return entry{}, false, err
	}
	return entry{b: b, c: c, e: e, loc: loc}, true, nil
}

// seek returns the first entry of (b, c) with epoch >= e.
func (p pagedIndex) seek(b uint32, c uint64, e uint32) (entry, bool, error) {
	var k meta.Key
	var loc uint64
	var ok bool
	var err error
	if p.noRead && p.r == nil {
		k, loc, ok, err = p.m.SeekNoRead(metaKey(b, c, e))
	} else {
		k, loc, ok, err = p.rd().Seek(metaKey(b, c, e))
	}
	if err != nil || !ok || k.B != b || k.C != c {
		return entry{}, false, err
	}
	return entryOf(k, loc), true, nil
}

// prev returns the last entry of (b, c) with epoch < e.
func (p pagedIndex) prev(b uint32, c uint64, e uint32) (entry, bool, error) {
	if e == 0 {
		return entry{}, false, nil
	}
	var k meta.Key
	var loc uint64
	var ok bool
	var err error
	if p.noRead && p.r == nil {
		k, loc, ok, err = p.m.PrevNoRead(metaKey(b, c, e))
	} else {
		k, loc, ok, err = p.rd().Prev(metaKey(b, c, e))
	}
	if err != nil || !ok || k.B != b || k.C != c {
		return entry{}, false, err
	}
	return entryOf(k, loc), true, nil
}

// last returns the entry of (b, c) with the greatest epoch below
// epochLive, as index.last does (its comment says "greatest epoch", but
// live entries are excluded, and the callers rely on that).
func (p pagedIndex) last(b uint32, c uint64) (entry, bool, error) {
	return p.prev(b, c, epochLive)
}

// epochBatch is how many chunks epochEntries collects from the epoch tree
// before it looks up their locations (the layer's iteration holds its
// lock, so lookups cannot run inside it).
const epochBatch = 256

// epochEntries calls fn for the entries of branch b at epoch e in chunk
// order, starting at chunk from, until fn returns false.
func (p pagedIndex) epochEntries(b uint32, e uint32, from uint64, fn func(entry) bool) error {
	batch := make([]uint64, 0, epochBatch)
	for {
		var err error
		if batch, err = p.epochBatchFrom(batch, b, e, from); err != nil {
			return err
		}
		for _, c := range batch {
			loc, ok, err := p.rd().Get(metaKey(b, c, e))
			if err != nil {
				return err
			}
			if !ok {
				return errors.New("snapshot: paged index: epoch tree lists a key the chunk tree lacks")
			}
			if !fn(entry{b: b, c: c, e: e, loc: loc}) {
				return nil
			}
		}
		p.pace()
		if len(batch) < epochBatch {
			return nil
		}
		from = batch[len(batch)-1] + 1
	}
}

// epochBatchFrom returns, in batch's array, up to epochBatch chunks of
// branch b at epoch e from chunk from on (fewer: the epoch's last).
func (p pagedIndex) epochBatchFrom(batch []uint64, b, e uint32, from uint64) ([]uint64, error) {
	batch = batch[:0]
	err := p.rd().AscendEpoch(b, e, from, func(c uint64) bool {
		batch = append(batch, c)
		return len(batch) < epochBatch
	})
	return batch, err
}

// epochChunks calls fn with the chunk and epoch of each entry of branch b
// with an epoch in [lo, hi), epoch by epoch, each in chunk order, and
// with hi itself when hiToo is set (hi may then be epochLive). It reads
// the epoch tree alone, each of its leaves once, where epochRange looks
// up every entry's location in the chunk tree: a diff of far-apart
// snapshots needs only the chunks, and one lookup per entry, in epoch
// order, is a random leaf of the chunk tree each time.
func (p pagedIndex) epochChunks(b, lo, hi uint32, hiToo bool, fn func(c uint64, e uint32) bool) error {
	batch := make([]uint64, 0, epochBatch)
	for e := lo; ; e++ {
		got, ok, err := p.rd().NextEpoch(b, e)
		if err != nil || !ok || got > hi || (got == hi && !hiToo) {
			return err
		}
		for from := uint64(0); ; {
			if batch, err = p.epochBatchFrom(batch, b, got, from); err != nil {
				return err
			}
			for _, c := range batch {
				if !fn(c, got) {
					return nil
				}
			}
			p.pace()
			if len(batch) < epochBatch {
				break
			}
			from = batch[len(batch)-1] + 1
		}
		if got == epochLive {
			return nil
		}
		e = got
	}
}

// pace lets other goroutines run between batches of a long walk of a
// committed view (Diff, Check, Rollback's planning, export, Stat's
// counters), as the view's page loads do (meta.View.Pace): such a walk is
// one goroutine busy for seconds, and a writer that becomes runnable
// behind it on a small machine waited for Go's 10 ms time slice. A walk
// of the live index (under the store's lock) is not paced: it holds
// writers up either way.
func (p pagedIndex) pace() {
	if v, ok := p.r.(*meta.View); ok {
		v.Pace()
	}
}

// branchEpochs calls fn with each distinct epoch that has entries in
// branch b, in increasing order.
func (p pagedIndex) branchEpochs(b uint32, fn func(e uint32) bool) error {
	for e := uint32(0); ; e++ {
		got, ok, err := p.rd().NextEpoch(b, e)
		if err != nil || !ok || !fn(got) || got == epochLive {
			return err
		}
		e = got
	}
}

// branchHas reports whether branch b has any entries.
func (p pagedIndex) branchHas(b uint32) (bool, error) {
	k, _, ok, err := p.rd().Seek(metaKey(b, 0, 0))
	return ok && k.B == b, err
}

func (p pagedIndex) len() int { return int(p.rd().Len()) }

// ascend calls fn for the entries at or after from in (b, c, e) order
// until fn returns false. fn runs outside the layer's lock (entries are
// collected in batches), so it may query the index.
func (p pagedIndex) ascend(from entry, fn func(entry) bool) error {
	batch := make([]entry, 0, epochBatch)
	k := metaKey(from.b, from.c, from.e)
	for {
		batch = batch[:0]
		err := p.rd().Ascend(k, func(k meta.Key, loc uint64) bool {
			batch = append(batch, entryOf(k, loc))
			return len(batch) < epochBatch
		})
		if err != nil {
			return err
		}
		for _, x := range batch {
			if !fn(x) {
				return nil
			}
		}
		p.pace()
		if len(batch) < epochBatch {
			return nil
		}
		last := batch[len(batch)-1]
		switch {
		case last.e < epochLive:
			k = metaKey(last.b, last.c, last.e+1)
		case last.c < ^uint64(0):
			k = metaKey(last.b, last.c+1, 0)
		case last.b < ^uint32(0):
			k = metaKey(last.b+1, 0, 0)
		default:
			return nil
		}
	}
}

// epochRange calls fn for the entries of branch b with epochs in
// [lo, hi), epoch by epoch, each in chunk order.
func (p pagedIndex) epochRange(b, lo, hi uint32, fn func(entry) bool) error {
	for e := lo; e < hi; e++ {
		got, ok, err := p.rd().NextEpoch(b, e)
		if err != nil || !ok || got >= hi {
			return err
		}
		stop := false
		if err := p.epochEntries(b, got, 0, func(x entry) bool {
			stop = !fn(x)
			return !stop
		}); err != nil || stop {
			return err
		}
		e = got
	}
	return nil
}

// branchAscend calls fn for the entries of branch b in (c, e) order.
func (p pagedIndex) branchAscend(b uint32, fn func(entry) bool) error {
	return p.ascend(entry{b: b}, func(x entry) bool { return x.b == b && fn(x) })
}

// prefetchOps waits for the layer's write-back if it is behind, and loads
// the index nodes that applying sc.ops will walk, before the caller takes
// Store.mu to log them: a page read there (a cache miss of the record's
// puts and deletes) would hold every reader and writer of the store for
// the read. While the layer is prefetching it also pins the paths it
// loaded into sc.pins, so that a scan beside it (Diff, Check, other
// writers' prefetches) cannot evict them while the caller waits for
// Store.mu; unlockOps unpins them. Called with no lock of the store held
// but branch gates and stripes (lock order: they come before the
// layer's lock, which the prefetch takes shared). It is a hint: a read
// error is left for the change itself to meet and report.
func (s *Store) prefetchOps(sc *scratch) {
	// Past the layer's write-back bound, wait here, without Store.mu,
	// rather than write back under it (docs/metadata.md section 16). An
	// error is left for the change to meet, as a read error is.
	_ = s.m.Throttle()
	fetch := func(b uint32, c uint64, e uint32) { _ = s.m.PrefetchPin(metaKey(b, c, e), &sc.pins) }
	for i := range sc.ops {
		o := &sc.ops[i]
		switch o.kind {
		case opPut, opDel:
			fetch(o.b, o.c, o.e)
			if o.n > 1 {
				fetch(o.b, o.c+o.n-1, o.e)
			}
		case opMove:
			fetch(o.b, o.c, o.e)
			fetch(o.b, o.c, o.e2)
		}
	}
}

// lockForOps takes Store.mu to apply sc.ops, after prefetchOps, and
// checks under it that the ops' index paths are still cached, pinning
// them in the layer's cache until unlockOps; if the tree changed between
// the prefetch and the lock (another change shadowed the path), it
// releases the lock and prefetches again, so that the change reads no
// page under Store.mu (docs/metadata.md sections 16 and 23). The pins
// keep the paths from being evicted between the prefetch and the change:
// by the change's own new nodes (the chunk tree's shadowed path evicted
// the epoch tree's) and by the pages that views and other lookups read
// meanwhile. After maxReadLoads tries it keeps the lock, and the change
// reads what it misses under it. The check runs only while the layer is
// prefetching (a page was read or a node evicted lately); a working set
// that fits the cache pays a few atomic loads. The caller ends with
// unlockOps.
func (s *Store) lockForOps(sc *scratch) {
	for tries := 0; ; tries++ {
		s.prefetchOps(sc)
		s.mu.Lock()
		if tries >= maxReadLoads || s.pinOpsLocked(sc) {
			return
		}
		sc.pins.Unpin()
		s.mu.Unlock()
	}
}

// unlockOps ends lockForOps: it unpins the change's paths and releases
// Store.mu.
func (s *Store) unlockOps(sc *scratch) {
	sc.pins.Unpin()
	s.mu.Unlock()
}

// pinOpsLocked reports whether the index paths sc.ops will walk are
// cached, and pins them if so (true while the layer is not prefetching).
// Called with mu held; on false the caller unpins.
func (s *Store) pinOpsLocked(sc *scratch) bool {
	if !s.m.Prefetching() {
		return true
	}
	pin := func(b uint32, c uint64, e uint32) bool { return s.m.PinPaths(metaKey(b, c, e), &sc.pins) }
	for i := range sc.ops {
		o := &sc.ops[i]
		switch o.kind {
		case opPut, opDel:
			if !pin(o.b, o.c, o.e) || o.n > 1 && !pin(o.b, o.c+o.n-1, o.e) {
				return false
			}
		case opMove:
			if !pin(o.b, o.c, o.e) || !pin(o.b, o.c, o.e2) {
				return false
			}
		}
	}
	return true
}
