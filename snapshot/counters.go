package snapshot

// Space counters of the origin's snapshots, and their section of the
// checkpoint image (version 3; checkpoint.go has the whole image), after
// the volumes:
//
//	field                                   encoding
//	present                                 uv: 0 not kept (Open rebuilds
//	                                        them), 1 kept; nothing follows 0
//	mapped: count of nonzero point values   uv
//	  per value, by increasing epoch        uv epoch minus the previous one
//	                                        (the first: minus 0; each >= 1),
//	                                        sv value (bytes, nonzero)
//	excl: count of held epochs with bytes   uv
//	  per epoch, increasing                 uv epoch delta as above, sv bytes
//	pres: count of nonzero point values     uv
//	  per value, by increasing position     uv position delta as above, sv
//	                                        bytes (position p+1: origin
//	                                        chunks preserved to epoch p)
//
// Every epoch is at most the origin's last epoch plus one.

import (
	"maps"
	"slices"
)

// The counters (docs/metadata.md section 15).
//
// An entry (0, c, e) of branch 0 is read by the snapshots numbered in
// (lo, e], lo being the epoch of the chunk's entry before it (0: none).
// Its held cover is the set of held epochs in that range. For every
// snapshot epoch E of branch 0 the store keeps, as entries change:
//
//   - mapped(E): the bytes of the data entries whose range holds E, as a
//     Fenwick tree of point deltas over epochs (+len at lo+1, -len at
//     e+1), so a put costs O(log epochs) and a query O(log epochs);
//   - excl[E]: the bytes of the data entries whose held cover is exactly
//     {E} (a snapshot's exclusive bytes, when one volume holds E).
//
// Both are exact at held epochs; what they hold for an epoch nothing holds
// is never read (such an epoch is never held again: new snapshots get
// greater numbers). That is what keeps the collector's work free of
// counter upkeep: it re-keys an entry at an unheld epoch to the newest
// held epoch still in its range, or drops an entry whose range holds no
// held epoch, and neither changes any held cover. The same argument lets
// an origin copy-on-write take lo from the chunk's preserved epoch
// (memory) instead of a lookup: preserved only grows, and no epoch
// between the chunk's true last entry and its preserved epoch is held.
//
// A held epoch added is always the newest (a new snapshot, or a clone's
// hidden parent point taken now), which no entry's range holds yet. A held
// epoch E removed (its last holder gone) merges the covers around it: an
// entry covering {p, E} now covers {p} alone, one covering {E, n} covers
// {n}. Those entries are keyed in [E, next held after n); heldRemoved
// visits them with a lookup each. So a delete costs the entries of the
// deleted snapshot and of the one after it, under the store's lock.

// epochSums is a Fenwick tree of int64 point values over epochs: position
// e is epoch e, and position 0 is unused (no snapshot has epoch 0, and a
// range starts at lo+1). Its size follows the origin's last epoch: 8 bytes
// per snapshot number ever handed out.
type epochSums struct {
	t []int64 // t[0] unused
}

// add adds v at epoch e (e > 0; callers bound e by the last epoch).
func (f *epochSums) add(e uint32, v int64) {
	if v == 0 || e == 0 {
		return
	}
	i := int(e)
	if i >= len(f.t) {
		f.grow(i + 1)
	}
	for ; i < len(f.t); i += i & -i {
		f.t[i] += v
	}
}

// sum returns the total of the values at epochs 1..e.
func (f *epochSums) sum(e uint32) int64 {
	i := min(int(e), len(f.t)-1)
	var s int64
	for ; i > 0; i -= i & -i {
		s += f.t[i]
	}
	return s
}

// values returns the point values, indexed by epoch (O(n)).
func (f *epochSums) values() []int64 {
	v := slices.Clone(f.t)
	for i := len(v) - 1; i > 0; i-- {
		if j := i + i&-i; j < len(v) {
			v[j] -= v[i]
		}
	}
	return v
}

// grow makes room for epochs below n, doubling so that growth is
// amortised O(1) per epoch handed out.
func (f *epochSums) grow(n int) {
	v := f.values()
	size := max(n, 2*len(v), 64)
	f.build(append(v, make([]int64, size-len(v))...))
}

// build makes the tree of point values v (v[0] unused) in O(len(v)),
// reusing v.
func (f *epochSums) build(v []int64) {
	for i := 1; i < len(v); i++ {
		if j := i + i&-i; j < len(v) {
			v[j] += v[i]
		}
	}
	f.t = v
}

func (f *epochSums) clone() epochSums { return epochSums{t: slices.Clone(f.t)} }

// counters are branch 0's per-snapshot counters. Guarded by Store.mu.
type counters struct {
	mapped epochSums
	excl   map[uint32]int64 // held epoch -> bytes; no key for 0
	// pres holds, at position p+1, the bytes of the origin chunks whose
	// preserved epoch is p: the origin's shared bytes (chunks a snapshot
	// newer than their last copy still reads from the origin device) are
	// pres.sum(need). Exact at held epochs, as the others: a chunk's bytes
	// may sit at a stale high preserved epoch, above which no held epoch
	// lies below its true one.
	pres epochSums
	// stale: not maintained (an image without counters was loaded, Open
	// replays records the tree already holds, or a migration loads an old
	// store); Open rebuilds them by one walk of branch 0 (settleCounters).
	stale bool
	// br: the counters of every other branch (clonecounters.go), by id;
	// a branch without one has none yet. brStale: they are not maintained
	// (a version 4 image) while branch 0's are; Open builds them.
	br      map[uint32]*bcounts
	brStale bool
}

func (c *counters) addExcl(e uint32, v int64) { addTo(&c.excl, e, v) }

// onlyHeld returns the one held epoch in (lo, e], or 0 if there are none
// or several.
func onlyHeld(held []uint32, lo, e uint32) uint32 {
	i, _ := slices.BinarySearch(held, lo+1)
	if i < len(held) && held[i] <= e && (i+1 == len(held) || held[i+1] > e) {
		return held[i]
	}
	return 0
}

// addEntry counts a data entry of branch 0 keyed at e whose previous entry
// is at lo, with held the held epochs at that instant.
func (c *counters) addEntry(held []uint32, lo, e uint32, n int64) {
	c.mapped.add(lo+1, n)
	c.mapped.add(e+1, -n)
	if h := onlyHeld(held, lo, e); h != 0 {
		c.addExcl(h, n)
	}
}

// countPut counts the put of origin chunk c at epoch e (data or not),
// before the index changes: its bytes move to preserved epoch e, and a
// data entry's range (lo, e] is counted. lo is the chunk's preserved epoch
// when known (an upper bound of its last entry's: see above), else looked
// up (during replay, and for a chunk not looked up since Open). Called
// with Store.mu held.
func (s *Store) countPut(c uint64, e uint32, data bool) error {
	if s.ctr.stale {
		return nil
	}
	if e == 0 || e > s.b0.lastEpoch {
		s.ctr.stale = true // a bad record, which the replay refuses or Check reports
		return nil
	}
	lo, known := s.pres.known(c)
	if s.replaying || !known {
		p, ok, err := s.ix.prev(0, c, e)
		if err != nil {
			return metaErr("index lookup", err)
		}
		lo = 0
		if ok {
			lo = p.e
		}
	}
	if lo >= e {
		// Not the chunk's newest entry: only a migration loads such puts,
		// and it rebuilds the counters after.
		s.ctr.stale = true
		return nil
	}
	n := s.chunkLen(c)
	s.ctr.pres.add(lo+1, -n)
	s.ctr.pres.add(e+1, n)
	if data {
		s.ctr.addEntry(s.b0.held, lo, e, n)
		if len(s.b0.children) > 0 {
			return s.fanOut(c, lo, e)
		}
	}
	return nil
}

// countChange notes a delete or move of an origin entry keyed at e. The
// collector's are free (see above); any other would change held covers,
// which no caller does: the counters are then marked stale, which Check
// reports.
func (s *Store) countChange(e uint32) {
	if !s.ctr.stale && s.b0.refs[e] > 0 {
		s.ctr.stale = true
	}
}

// refAt changes the holders of epoch e of br as br.ref does, and keeps
// branch 0's counters when e becomes held or stops being held. Called with
// Store.mu held.
func (s *Store) refAt(br *branch, e uint32, d int32) (nowZero bool, err error) {
	was := br.refs[e] > 0
	nowZero = br.ref(e, d)
	if s.ctr.stale || was == !nowZero || br.id != 0 && s.ctr.brStale {
		return nowZero, nil
	}
	if !was { // added: the newest held epoch, or the counters cannot say
		s.branchHeldAdded(br, e)
		return nowZero, nil
	}
	return nowZero, s.heldRemoved(br, e)
}

// heldRemoved moves the bytes whose cover loses epoch e to the neighbour
// that now holds them alone: entries covering {p, e} to p, entries covering
// {e, n} to n (p and n the held epochs around e, pp before p, nn after n).
func (s *Store) heldRemoved(br *branch, e uint32) error {
	excl, unit := &s.ctr.excl, s.chunkLen // branch 0 counts bytes
	var bc *bcounts
	if br.id != 0 { // other branches count chunks (clonecounters.go)
		if bc = s.bcountsOf(br.id); bc == nil {
			return nil
		}
		excl, unit = &bc.excl, func(uint64) int64 { return 1 }
	}
	addTo(excl, e, -(*excl)[e])
	i, _ := slices.BinarySearch(br.held, e)
	var pp, p, n, nn uint32
	if i > 0 {
		p = br.held[i-1]
	}
	if i > 1 {
		pp = br.held[i-2]
	}
	// No origin entry is keyed above lastEpoch; a clone's live entries are
	// read by its live volume too, or are counted from liveLo below.
	hi := br.lastEpoch + 1
	if br.id != 0 {
		hi = epochLive
	}
	if i < len(br.held) {
		n = br.held[i]
		if i+1 < len(br.held) {
			nn = br.held[i+1]
			hi = nn
		}
	}
	var lerr error
	err := s.ix.epochRange(br.id, e, hi, func(x entry) bool {
		if !x.isData() {
			return true
		}
		lo := uint32(0)
		pv, ok, err := s.ix.prev(br.id, x.c, x.e)
		if err != nil {
			lerr = err
			return false
		}
		if ok {
			lo = pv.e
		}
		switch {
		case n == 0 || x.e < n: // covered e and maybe p
			if p != 0 && lo >= pp && lo < p {
				addTo(excl, p, unit(x.c))
			}
		case lo >= p && lo < e: // covered e and n
			addTo(excl, n, unit(x.c))
		}
		return true
	})
	if err == nil {
		err = lerr
	}
	if err != nil {
		return metaErr("counter upkeep", err)
	}
	if bc != nil && !br.live {
		liveHeldRemoved(bc, e, pp, p, n, nn)
	}
	return nil
}

// counterBuilder recomputes branch 0's counters from its entries in (c, e)
// order: Check's oracle, and Open's rebuild of stale counters.
type counterBuilder struct {
	ctr    counters
	held   []uint32
	last   uint32 // the origin's last epoch: entries above it are Check's to report
	c      uint64
	lastE  uint32
	n      int64 // bytes of chunk c
	inside bool
	placed int64 // bytes of the chunks with entries, placed in pres
}

// add counts x, the next entry of branch 0 in (c, e) order, of n bytes.
func (b *counterBuilder) add(x entry, n int64) {
	if x.e > b.last {
		return
	}
	lo := uint32(0)
	if b.inside && b.c == x.c {
		lo = b.lastE
	} else {
		b.endChunk()
	}
	b.c, b.lastE, b.n, b.inside = x.c, x.e, n, true
	if x.isData() {
		b.ctr.addEntry(b.held, lo, x.e, n)
	}
}

// endChunk places the chunk just walked at its preserved epoch.
func (b *counterBuilder) endChunk() {
	if b.inside {
		b.ctr.pres.add(b.lastE+1, b.n)
		b.placed += b.n
		b.inside = false
	}
}

// finish places the origin chunks without entries (of size bytes in all)
// at preserved epoch 0 and returns the counters.
func (b *counterBuilder) finish(size int64) counters {
	b.endChunk()
	b.ctr.pres.add(1, size-b.placed)
	return b.ctr
}

// buildCounters walks branch 0 of ix. Called with Store.mu held.
func (s *Store) buildCounters(ix pagedIndex) (counters, error) {
	b := counterBuilder{held: s.b0.held, last: s.b0.lastEpoch}
	err := ix.branchAscend(0, func(x entry) bool {
		b.add(x, s.chunkLen(x.c))
		return true
	})
	if err != nil {
		return counters{}, metaErr("counter rebuild", err)
	}
	return b.finish(s.geo.originSize), nil
}

// countFormat sets the counters of a new store: every origin chunk
// preserved to epoch 0, no snapshot.
func (s *Store) countFormat() {
	s.ctr = counters{}
	s.ctr.pres.add(1, s.geo.originSize)
}

// settleCounters rebuilds stale counters (Open, after the replay). Its
// cost is one walk of branch 0's entries, and of the other branches'
// (with a resolution down the chain per chunk with entries); an Open
// after a clean Close or most crashes finds them current and walks
// nothing. A version 4 image has branch 0's only: the others are built.
func (s *Store) settleCounters() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ctr.stale && !s.ctr.brStale {
		return nil
	}
	if s.ctr.stale {
		c, err := s.buildCounters(s.ix)
		if err != nil {
			return err
		}
		s.ctr = c
	}
	br, err := s.buildBranchCounters()
	if err != nil {
		return err
	}
	s.ctr.br, s.ctr.brStale, s.ctrRebuilt = br, false, true
	return nil
}

// snapshotStatLocked answers Stat of a snapshot of the origin from the
// counters. Called with Store.mu held.
func (s *Store) snapshotStatLocked(v *volume) VolumeStat {
	st := VolumeStat{VolumeInfo: s.infoLocked(v)}
	st.Mapped = s.ctr.mapped.sum(v.epoch)
	if s.b0.refs[v.epoch] == 1 {
		st.Exclusive = s.ctr.excl[v.epoch]
	}
	st.Shared = st.Mapped - st.Exclusive
	return st
}

// checkCounters compares the counters copied with a check's view (got)
// with those its walk recomputed (want), at every held epoch of branch 0.
func checkCounters(got, want *counters, held []uint32, bad func(string, ...any) bool) {
	if got.stale {
		bad("origin snapshot counters are not maintained")
		return
	}
	for _, e := range append([]uint32{0}, held...) {
		if g, w := got.pres.sum(e), want.pres.sum(e); g != w {
			bad("origin: %d bytes preserved below epoch %d by the counters, %d by the entries", g, e, w)
		}
		if e == 0 {
			continue
		}
		if g, w := got.mapped.sum(e), want.mapped.sum(e); g != w {
			bad("origin snapshot at epoch %d: mapped counter %d bytes, entries map %d", e, g, w)
		}
		if g, w := got.excl[e], want.excl[e]; g != w {
			bad("origin snapshot at epoch %d: exclusive counter %d bytes, entries give %d", e, g, w)
		}
	}
	for e, n := range got.excl {
		if _, ok := slices.BinarySearch(held, e); !ok {
			bad("exclusive counter of %d bytes at epoch %d that nothing holds", n, e)
		}
	}
}

// encodeTo writes the checkpoint image's counters section (layout at the
// top of the file).
func (c *counters) encodeTo(e *encoder) {
	if c.stale {
		e.uv(0)
		return
	}
	e.uv(1)
	encodeSums(e, &c.mapped)
	keys := slices.Sorted(maps.Keys(c.excl))
	e.uv(uint64(len(keys)))
	prev := uint32(0)
	for _, k := range keys {
		e.uv(uint64(k - prev))
		e.sv(c.excl[k])
		prev = k
	}
	encodeSums(e, &c.pres)
}

// encodeSums writes f's nonzero point values (encodeSparse).
func encodeSums(e *encoder, f *epochSums) { encodeSparse(e, f.values(), e.sv) }

// loadCounters decodes the section; every epoch must be at most one past
// the origin's last epoch, which bounds what it allocates by what the
// image already declared.
func (s *Store) loadCounters(d *ckptReader) {
	switch d.uv() {
	case 0:
		return // stays stale
	case 1:
	default:
		d.fail("counters flag")
		return
	}
	var c counters
	limit := uint64(s.b0.lastEpoch) + 1
	for part := range 3 { // mapped, excl, pres
		n := d.uv()
		e := uint64(0)
		for i := uint64(0); i < n && d.err == nil; i++ {
			step := d.uv()
			e += step
			v := d.sv()
			if d.err != nil {
				return
			}
			if step == 0 || e > limit || v == 0 {
				d.fail("counter %d at epoch %d (last %d)", v, e, limit-1)
				return
			}
			switch part {
			case 0:
				c.mapped.add(uint32(e), v)
			case 1:
				c.addExcl(uint32(e), v)
			default:
				c.pres.add(uint32(e), v)
			}
		}
	}
	if d.err == nil {
		s.ctr = c
	}
}

// clone copies the counters for a capture; each branch's (bcounts) it
// shares, marked so that the next change copies them first.
func (c *counters) clone() counters {
	br := make(map[uint32]*bcounts, len(c.br))
	for id, b := range c.br {
		b.shared = true
		br[id] = b
	}
	return counters{mapped: c.mapped.clone(), excl: maps.Clone(c.excl), pres: c.pres.clone(), stale: c.stale,
		br: br, brStale: c.brStale}
}
