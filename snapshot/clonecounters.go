package snapshot

// Space counters of clones, blank volumes and their snapshots, and their
// section of the checkpoint image (version 5), after the origin's
// counters (counters.go):
//
//	field                                   encoding
//	present                                 uv: 0 not kept (Open builds
//	                                        them), 1 kept; nothing follows 0
//	branch count                            uv
//	  per branch, by increasing id          uv id minus the previous (the
//	                                        first: minus 0; each >= 1)
//	  own, cov, liveLo: each                uv count of nonzero point
//	                                        values; per value, by position,
//	                                        uv position delta (>= 1), sv
//	                                        chunks
//	  excl                                  uv count; per held epoch, uv
//	                                        epoch delta (>= 1), sv chunks
//
// Every position is at most the branch's last epoch plus one, and every id
// names a branch of the image.

import (
	"fmt"
	"maps"
	"slices"
)

// bcounts are the counters of a branch other than 0, in chunks
// (docs/metadata.md section 15). An entry (b, c, e) whose previous entry
// for c is at lo covers b's epochs (lo, e]; a live entry covers (lo, live].
// Positions are epochs (position lo+1 starts a range); a live entry's
// range has no end, so the sum over every position is the live volume's.
// Like branch 0's, they are exact at held epochs and at the live epoch.
type bcounts struct {
	own    epochSums        // data entries
	cov    epochSums        // non-inherit entries whose chunk the parent point maps
	liveLo epochSums        // live data entries, by lo+1
	excl   map[uint32]int64 // held epoch -> data entries read by it alone
	// shared: a capture (a checkpoint image, a check) holds these very
	// counters and reads them without the store's lock, so the next change
	// works on a copy (bcountsOf). A tree commit then copies only the
	// branches that changed since the last. Written under Store.mu.
	shared bool
}

func (b *bcounts) clone() *bcounts {
	return &bcounts{own: b.own.clone(), cov: b.cov.clone(), liveLo: b.liveLo.clone(), excl: maps.Clone(b.excl)}
}

// addTo adds v to m[e], dropping the key at zero.
func addTo(m *map[uint32]int64, e uint32, v int64) {
	if *m == nil {
		*m = map[uint32]int64{}
	}
	if n := (*m)[e] + v; n != 0 {
		(*m)[e] = n
	} else {
		delete(*m, e)
	}
}

// exclKey is the held epoch whose holders alone read an entry covering
// (lo, e] of a branch with held epochs held, or 0: a live entry of a live
// branch is read by the live volume too.
func exclKey(held []uint32, live bool, lo, e uint32) uint32 {
	if e == epochLive {
		if live {
			return 0
		}
		e = epochLive - 1
	}
	return onlyHeld(held, lo, e)
}

// count adds (sign 1) or removes (sign -1) entry x, whose previous entry
// is at lo, on a branch with held epochs held; mp: the parent point maps
// x's chunk.
func (b *bcounts) count(held []uint32, live bool, x entry, lo uint32, mp bool, sign int64) {
	if x.loc == locInherit {
		return
	}
	if mp {
		b.cov.addRange(lo, x.e, sign)
	}
	if !x.isData() {
		return
	}
	b.own.addRange(lo, x.e, sign)
	if x.e == epochLive {
		b.liveLo.add(lo+1, sign)
	}
	if h := exclKey(held, live, lo, x.e); h != 0 {
		addTo(&b.excl, h, sign)
	}
}

// addRange adds v over the epochs (lo, e]: at lo+1, and its negation at
// e+1 unless e is the live epoch (a live entry's range has no end).
func (f *epochSums) addRange(lo, e uint32, v int64) {
	f.add(lo+1, v)
	if e != epochLive {
		f.add(e+1, -v)
	}
}

// bcountsOf returns br's counters, made empty on first use (a new branch
// has no entries), or nil when they are not maintained. Called with
// Store.mu held.
func (s *Store) bcountsOf(id uint32) *bcounts {
	if s.ctr.stale || s.ctr.brStale {
		return nil
	}
	bc := s.ctr.br[id]
	if bc == nil || bc.shared {
		if bc == nil {
			bc = &bcounts{}
		} else {
			bc = bc.clone()
		}
		if s.ctr.br == nil {
			s.ctr.br = map[uint32]*bcounts{}
		}
		s.ctr.br[id] = bc
	}
	return bc
}

// counted reports whether a change of br's entry at epoch e needs upkeep:
// entries at epochs nothing holds are the collector's, which changes no
// held cover (counters.go); live entries are counted while they exist.
func counted(br *branch, e uint32) bool { return e == epochLive || br.refs[e] > 0 }

// parentMaps reports whether br's parent point reads chunk c from a store
// copy, resolving down the chain as a read does. Called with Store.mu
// held.
func (s *Store) parentMaps(br *branch, c uint64) (bool, error) {
	if br.up == nil {
		return false, nil
	}
	var chain [16]level // room for most chains without an allocation
	loc, fromOrigin, err := s.resolveLocked(br.chainLevels(chain[:0]), c)
	return err == nil && !fromOrigin && loc != locZero, err
}

// countBranchEntry adds (sign 1) or removes (sign -1) entry x of clone
// or root branch br when a change of the index needs upkeep (counted).
// Called in the apply path with Store.mu held, the index not holding x
// when it is removed, holding it (or not) when it is added: the previous
// entry is looked up below x's epoch either way.
func (s *Store) countBranchEntry(br *branch, x entry, sign int64) error {
	if x.loc == locInherit || !counted(br, x.e) {
		return nil
	}
	bc := s.bcountsOf(br.id)
	if bc == nil {
		return nil
	}
	lo, mp, err := s.branchLoMP(br, x.c, x.e)
	if err == nil {
		bc.count(br.held, br.live, x, lo, mp, sign)
	}
	return err
}

// branchLoMP returns the epoch of br's entry of c before epoch e (0: none)
// and whether br's parent point maps c.
func (s *Store) branchLoMP(br *branch, c uint64, e uint32) (lo uint32, mp bool, err error) {
	p, ok, err := s.ix.prev(br.id, c, e)
	if err != nil {
		return 0, false, metaErr("index lookup", err)
	}
	if ok {
		lo = p.e
	}
	mp, err = s.parentMaps(br, c)
	return lo, mp, err
}

// moveBranchEntry moves x of br, just deleted from the index, to epoch e2
// in the counters, before it is put there: the same previous entry and
// parent point cover it before and after.
func (s *Store) moveBranchEntry(br *branch, x entry, e2 uint32) error {
	if x.loc == locInherit || !counted(br, x.e) {
		return nil
	}
	bc := s.bcountsOf(br.id)
	if bc == nil {
		return nil
	}
	lo, mp, err := s.branchLoMP(br, x.c, x.e)
	if err != nil {
		return err
	}
	bc.count(br.held, br.live, x, lo, mp, -1)
	x.e = e2
	bc.count(br.held, br.live, x, lo, mp, 1)
	return nil
}

// branchHeldAdded notes that epoch e of br became held: its newest, which
// only live entries cover, and they are in no excl. Anything else the
// counters cannot follow.
func (s *Store) branchHeldAdded(br *branch, e uint32) {
	if br.held[len(br.held)-1] != e {
		s.ctr.stale = true
	}
}

// liveRemoved notes that br's live volume is gone: its live entries that
// only the newest held epoch h covers (lo in [p, h), p the held epoch
// before h) are now h's alone.
func (s *Store) liveRemoved(br *branch) {
	bc := s.bcountsOf(br.id)
	if bc == nil || len(br.held) == 0 {
		return
	}
	h, p := br.held[len(br.held)-1], uint32(0)
	if len(br.held) > 1 {
		p = br.held[len(br.held)-2]
	}
	addTo(&bc.excl, h, bc.liveLo.sum(h)-bc.liveLo.sum(p))
}

// liveHeldRemoved is heldRemoved's part for the live entries of a branch
// whose live volume is gone: they cover every held epoch above their lo.
// p, pp, n and nn are heldRemoved's (0: none).
func liveHeldRemoved(bc *bcounts, e, pp, p, n, nn uint32) {
	switch {
	case n == 0 && p != 0: // covered {p, e}: lo in [pp, p)
		addTo(&bc.excl, p, bc.liveLo.sum(p)-bc.liveLo.sum(pp))
	case n != 0 && nn == 0: // covered {e, n}: lo in [p, e)
		addTo(&bc.excl, n, bc.liveLo.sum(e)-bc.liveLo.sum(p))
	}
}

// fanOut keeps cov exact when an origin copy-on-write preserves chunk c
// for the epochs (lo, e]: the clones whose parent point is an origin
// snapshot in that range now see c mapped, through every level that passes
// it. Called with Store.mu held, in the apply path.
func (s *Store) fanOut(c uint64, lo, e uint32) error {
	if s.ctr.stale || s.ctr.brStale {
		return nil
	}
	for _, ch := range s.b0.children {
		if ch.parentEpoch > lo && ch.parentEpoch <= e {
			if err := s.fanOutTo(ch, c); err != nil {
				return err
			}
		}
	}
	return nil
}

// fanOutTo counts br's own entries of c as covering a mapped chunk, and
// goes on to the clones of br whose parent point passes c.
func (s *Store) fanOutTo(br *branch, c uint64) error {
	var room [8]entry // a chunk's entries on one branch: usually one or two
	xs := room[:0]
	for e := uint32(0); br.groups.mayHave(c); e++ {
		x, ok, err := s.ix.seek(br.id, c, e)
		if err != nil {
			return metaErr("counter upkeep", err)
		}
		if !ok {
			break
		}
		xs = append(xs, x)
		if x.e == epochLive {
			break
		}
		e = x.e
	}
	if len(xs) > 0 {
		bc := s.bcountsOf(br.id)
		lo := uint32(0)
		for _, x := range xs {
			if x.loc != locInherit {
				bc.cov.addRange(lo, x.e, 1)
			}
			lo = x.e
		}
	}
	for _, ch := range br.children {
		if passes(xs, ch.parentEpoch) {
			if err := s.fanOutTo(ch, c); err != nil {
				return err
			}
		}
	}
	return nil
}

// passes reports whether a read at epoch e passes a level whose entries
// of the chunk are xs (in epoch order) to the level below.
func passes(xs []entry, e uint32) bool {
	i, _ := slices.BinarySearchFunc(xs, e, func(x entry, e uint32) int { return cmpU32(x.e, e) })
	return i == len(xs) || xs[i].loc == locInherit
}

func cmpU32(a, b uint32) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// mappedChunks is the chunks volume (br, e) reads from store copies,
// counting every chunk whatever the sizes: its own data entries, plus its
// parent point's where its own level passes. Called with Store.mu held
// and the counters maintained.
func (s *Store) mappedChunks(br *branch, e uint32) (int64, error) {
	var n int64
	for b := br; ; {
		bc := s.ctr.br[b.id]
		if bc != nil {
			n += bc.own.sum(e) - bc.cov.sum(e)
		}
		if b.up == nil {
			return n, nil
		}
		e = b.parentEpoch
		b = b.up
		if b.id == 0 {
			m, err := s.originMappedChunks(e)
			return n + m, err
		}
	}
}

// originMappedChunks is the chunks origin snapshot e maps, its last chunk
// counted whole (the byte counter counts only its part within the origin).
func (s *Store) originMappedChunks(e uint32) (int64, error) {
	bytes := s.ctr.mapped.sum(e)
	if last := s.chunks - 1; s.chunks > 0 && s.chunkLen(last) != s.cs {
		x, ok, err := s.ix.seek(0, last, e)
		if err != nil {
			return 0, metaErr("index lookup", err)
		}
		if ok && x.isData() {
			bytes += s.cs - s.chunkLen(last)
		}
	}
	return bytes / s.cs, nil
}

// countsFitSize reports whether no level of the chain of br has an entry
// at or past chunk vc, so that counters over every chunk equal the walk's
// over the volume's size: one seek per level.
func (s *Store) countsFitSize(br *branch, vc uint64) (bool, error) {
	for b := br; b != nil; b = b.up {
		if b.id == 0 && vc >= s.chunks {
			break
		}
		k, _, ok, err := s.ix.rd().Seek(metaKey(b.id, vc, 0))
		if err != nil {
			return false, metaErr("index lookup", err)
		}
		if ok && k.B == b.id {
			return false, nil
		}
	}
	return true, nil
}

// cloneStatLocked answers Stat of a clone, a blank volume or one of their
// snapshots from the counters; ok false: the counters cannot (not
// maintained, or the volume is smaller than what its chain maps), and the
// caller walks. Called with Store.mu held.
func (s *Store) cloneStatLocked(v *volume) (st VolumeStat, ok bool, err error) {
	br := s.branches[v.branch]
	if br == nil || s.ctr.stale || s.ctr.brStale {
		return st, false, nil
	}
	st.VolumeInfo = s.infoLocked(v)
	vc := uint64((st.Size + s.cs - 1) / s.cs)
	if fits, err := s.countsFitSize(br, vc); err != nil || !fits {
		return st, false, err
	}
	m, err := s.mappedChunks(br, v.epoch)
	if err != nil {
		return st, false, err
	}
	var x int64
	bc := s.ctr.br[br.id]
	switch {
	case bc == nil:
	case v.epoch == epochLive:
		need := br.need.Load()
		x = bc.liveLo.sum(epochLive) - bc.liveLo.sum(need)
	case br.refs[v.epoch] == 1:
		x = bc.excl[v.epoch]
	}
	st.Mapped, st.Exclusive = m*s.cs, x*s.cs
	if tail := int64(vc)*s.cs - st.Size; tail > 0 {
		mapped, excl, err := s.chunkState(br, v.epoch, vc-1)
		if err != nil {
			return st, false, err
		}
		if mapped {
			st.Mapped -= tail
		}
		if excl {
			st.Exclusive -= tail
		}
	}
	st.Shared = st.Mapped - st.Exclusive
	return st, true, nil
}

// chunkState resolves chunk c of volume (br, e): whether it reads from a
// store copy, and whether that copy is read by this volume alone.
func (s *Store) chunkState(br *branch, e uint32, c uint64) (mapped, excl bool, err error) {
	var x entry
	var ok bool
	if e == epochLive {
		x, ok, err = s.ix.get(br.id, c, epochLive)
	} else {
		x, ok, err = s.ix.seek(br.id, c, e)
	}
	if err != nil {
		return false, false, metaErr("index lookup", err)
	}
	if !ok || x.loc == locInherit {
		mapped, err = s.parentMaps(br, c)
		return mapped, false, err
	}
	if !x.isData() {
		return false, false, nil
	}
	lo := uint32(0)
	p, ok, err := s.ix.prev(br.id, c, x.e)
	if err != nil {
		return false, false, metaErr("index lookup", err)
	}
	if ok {
		lo = p.e
	}
	h := holdersOf(br)
	return true, h.readers(lo, x.e) == 1, nil
}

// branchBuilder recomputes one branch's counters from its entries in
// (c, e) order: Check's oracle and Open's build.
type branchBuilder struct {
	bc     bcounts
	held   []uint32
	live   bool
	c      uint64
	lastE  uint32
	inside bool
	mpC    uint64 // the chunk mp was resolved for
	mp     bool
	mpOK   bool
}

// add counts x, the next entry of the branch, with maps resolving whether
// the parent point maps a chunk (called once per chunk with entries that
// are not inherit).
func (b *branchBuilder) add(x entry, maps func(c uint64) (bool, error)) error {
	lo := uint32(0)
	if b.inside && b.c == x.c {
		lo = b.lastE
	}
	b.c, b.lastE, b.inside = x.c, x.e, true
	if x.loc == locInherit {
		return nil
	}
	if !b.mpOK || b.mpC != x.c {
		mp, err := maps(x.c)
		if err != nil {
			return err
		}
		b.mp, b.mpC, b.mpOK = mp, x.c, true
	}
	b.bc.count(b.held, b.live, x, lo, b.mp, 1)
	return nil
}

// chainMaps resolves chunk c at epoch e of branch b and down its parents,
// on ix, with parentOf giving a branch's parent point (ok false: a root):
// whether a store copy is read.
func chainMaps(ix pagedIndex, b, e uint32, c uint64, parentOf func(uint32) (uint32, uint32, bool)) (bool, error) {
	for {
		x, ok, err := ix.seek(b, c, e)
		if err != nil {
			return false, metaErr("index lookup", err)
		}
		if ok && x.loc != locInherit {
			return x.isData(), nil
		}
		if b == 0 {
			return false, nil
		}
		pb, pe, ok := parentOf(b)
		if !ok {
			return false, nil
		}
		b, e = pb, pe
	}
}

// buildBranchCounters walks every branch but 0 of the live index and
// makes their counters (Open, when the image had none). Called with
// Store.mu held.
func (s *Store) buildBranchCounters() (map[uint32]*bcounts, error) {
	out := map[uint32]*bcounts{}
	parentOf := func(b uint32) (uint32, uint32, bool) {
		br := s.branches[b]
		if br == nil || br.up == nil {
			return 0, 0, false
		}
		return br.up.id, br.parentEpoch, true
	}
	for id, br := range s.branches {
		if id == 0 {
			continue
		}
		b := branchBuilder{held: br.held, live: br.live}
		var lerr error
		err := s.ix.branchAscend(id, func(x entry) bool {
			lerr = b.add(x, func(c uint64) (bool, error) {
				pb, pe, ok := parentOf(id)
				if !ok {
					return false, nil
				}
				return chainMaps(s.ix, pb, pe, c, parentOf)
			})
			return lerr == nil
		})
		if err == nil {
			err = lerr
		}
		if err != nil {
			return nil, metaErr("counter build", err)
		}
		bc := b.bc
		out[id] = &bc
	}
	return out, nil
}

// checkBranchCounters compares branch b's counters (got; nil: none) with
// what its entries give (want; nil: no entries), at each held epoch and,
// for a live branch, at the live epoch.
func checkBranchCounters(b uint32, got, want *bcounts, held []uint32, live bool, need uint32, bad func(string, ...any) bool) {
	var empty bcounts
	if got == nil {
		got = &empty
	}
	if want == nil {
		want = &empty
	}
	type sums struct {
		name string
		g, w *epochSums
	}
	for _, f := range []sums{{"own", &got.own, &want.own}, {"cov", &got.cov, &want.cov}, {"liveLo", &got.liveLo, &want.liveLo}} {
		at := held
		if live {
			at = append(slices.Clone(held), epochLive)
		}
		for _, e := range at {
			if g, w := f.g.sum(e), f.w.sum(e); g != w {
				bad("branch %d: %s counter at epoch %s is %d chunks, entries give %d", b, f.name, epochName(e), g, w)
			}
		}
	}
	if live {
		if g, w := got.liveLo.sum(need), want.liveLo.sum(need); g != w {
			bad("branch %d: live entries below epoch %d: counter %d chunks, entries give %d", b, need, g, w)
		}
	}
	for _, e := range held {
		if g, w := got.excl[e], want.excl[e]; g != w {
			bad("branch %d: exclusive counter at epoch %d is %d chunks, entries give %d", b, e, g, w)
		}
	}
	for e, n := range got.excl {
		if _, ok := slices.BinarySearch(held, e); !ok {
			bad("branch %d: exclusive counter of %d chunks at epoch %d that nothing holds", b, n, e)
		}
	}
}

func epochName(e uint32) string {
	if e == epochLive {
		return "live"
	}
	return fmt.Sprint(e)
}

// encodeBranches writes the image's branch counters section (layout at the
// top of the file).
func (c *counters) encodeBranches(e *encoder) {
	if c.stale || c.brStale {
		e.uv(0)
		return
	}
	e.uv(1)
	ids := slices.Sorted(maps.Keys(c.br))
	e.uv(uint64(len(ids)))
	prev := uint32(0)
	for _, id := range ids {
		e.uv(uint64(id - prev))
		prev = id
		bc := c.br[id]
		encodeSums(e, &bc.own)
		encodeSums(e, &bc.cov)
		encodeSums(e, &bc.liveLo)
		keys := slices.Sorted(maps.Keys(bc.excl))
		e.uv(uint64(len(keys)))
		pk := uint32(0)
		for _, k := range keys {
			e.uv(uint64(k - pk))
			e.sv(bc.excl[k])
			pk = k
		}
	}
}

// loadBranchCounters decodes the section; each branch must exist and each
// position be at most one past its last epoch, which bounds what it
// allocates by what the image already declared.
func (s *Store) loadBranchCounters(d *ckptReader) {
	switch d.uv() {
	case 0:
		return // stays stale: Open builds them
	case 1:
	default:
		d.fail("branch counters flag")
		return
	}
	n := d.uv()
	if d.err == nil && n > uint64(len(s.branches)) {
		d.fail("counters of %d branches, %d in the image", n, len(s.branches))
		return
	}
	out := make(map[uint32]*bcounts, n)
	id := uint64(0)
	for i := uint64(0); i < n && d.err == nil; i++ {
		step := d.uv()
		id += step
		br := s.branches[uint32(id)]
		if d.err == nil && (step == 0 || id > 0xffffffff || br == nil) {
			d.fail("counters of branch %d, not in the image", id)
			return
		}
		bc := &bcounts{}
		limit := uint64(br.lastEpoch) + 1
		for part := range 4 { // own, cov, liveLo, excl
			cnt := d.uv()
			e := uint64(0)
			for j := uint64(0); j < cnt && d.err == nil; j++ {
				step := d.uv()
				e += step
				v := d.sv()
				if d.err != nil {
					return
				}
				if step == 0 || e > limit || v == 0 {
					d.fail("branch %d counter %d at epoch %d (last %d)", id, v, e, limit-1)
					return
				}
				switch part {
				case 0:
					bc.own.add(uint32(e), v)
				case 1:
					bc.cov.add(uint32(e), v)
				case 2:
					bc.liveLo.add(uint32(e), v)
				default:
					addTo(&bc.excl, uint32(e), v)
				}
			}
		}
		out[uint32(id)] = bc
	}
	if d.err == nil {
		s.ctr.br, s.ctr.brStale = out, false
	}
}

// branchChecker is Check's oracle for the branch counters: a builder per
// branch with entries, fed in the walk's (b, c, e) order.
type branchChecker struct {
	cs       *checkState
	builders map[uint32]*branchBuilder
}

func (k *branchChecker) parentOf(b uint32) (uint32, uint32, bool) {
	cb := k.cs.branches[b]
	if cb == nil || !cb.hasParent {
		return 0, 0, false
	}
	return cb.parent, cb.parentEpoch, true
}

// add counts x, an entry of a branch other than 0 that the walk found
// valid, resolving on ix whether its parent point maps its chunk.
func (k *branchChecker) add(ix pagedIndex, x entry) error {
	if k.builders == nil {
		k.builders = map[uint32]*branchBuilder{}
	}
	b := k.builders[x.b]
	if b == nil {
		cb := k.cs.branches[x.b]
		b = &branchBuilder{held: cb.held, live: cb.live}
		k.builders[x.b] = b
	}
	return b.add(x, func(c uint64) (bool, error) {
		pb, pe, ok := k.parentOf(x.b)
		if !ok {
			return false, nil
		}
		return chainMaps(ix, pb, pe, c, k.parentOf)
	})
}

// check compares every branch's counters with what the walk gave.
func (k *branchChecker) check(cs *checkState, bad func(string, ...any) bool) {
	if cs.ctr.stale {
		return // checkCounters reports it
	}
	if cs.ctr.brStale {
		bad("branch counters are not maintained")
		return
	}
	for id, cb := range cs.branches {
		if id == 0 {
			continue
		}
		var want *bcounts
		if b := k.builders[id]; b != nil {
			want = &b.bc
		}
		var need uint32
		if len(cb.held) > 0 {
			need = cb.held[len(cb.held)-1]
		}
		checkBranchCounters(id, cs.ctr.br[id], want, cb.held, cb.live, need, bad)
	}
	for id := range cs.ctr.br {
		if cs.branches[id] == nil {
			bad("counters of branch %d, which does not exist", id)
		}
	}
}
