package snapshot

import (
	"errors"
	"maps"
	"slices"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Check verifies every invariant of the store's state and returns nil if
// all hold, else a *blockdev.CheckError wrapping ErrCorrupt that holds every
// problem found (CheckReport returns them as a list). On a writable store
// it checks the state as of its start, from a committed view of the index,
// and holds the store's lock only to freeze that commit and check the
// volume tables, so it may run while the store is in use; it works on a
// store opened with Options.ReadOnly too (there, under the lock):
//   - entries are ordered, within bounds (branch exists, chunk < chunks,
//     location in the data region) and the two index trees agree;
//   - every entry's epoch is held (a live snapshot, a hidden parent point,
//     or the live epoch of a live clone) or queued for the collector;
//   - each store chunk is referenced by at most one entry, and the data
//     space map equals the referenced set (plus the copies in flight,
//     when checked live; a commit shows those free);
//   - the metadata region's commit passes meta's Check (pages,
//     tree order and fill, the two trees agree, space maps against
//     what the trees and maps reach);
//   - every volume's branch exists, every snapshot's epoch was handed out,
//     every clone's parent point is held, reference counts match the
//     volumes and branches that hold them, and hidden snapshots have clones;
//   - the origin's preserved epochs cover its entries and the per-branch
//     summaries cover every entry;
//   - the origin snapshots' counters (mapped and exclusive bytes at each
//     held epoch) equal what its entries give, and so do every other
//     branch's (clonecounters.go) at each held epoch and the live one.
//
// A store opened with Options.ReadOnly beside a live writer (a device
// without a lock) returns a *StoreChangedError (ErrStoreChanged) instead
// of its findings when the writer has committed since the Open: what it
// found may be pages the writer reused (livero.go).
func (s *Store) Check() error {
	rep, changed := s.checkReport()
	if changed != nil {
		return changed
	}
	return rep.Err(ErrCorrupt)
}

// CheckReport runs the checks of Check and lists every problem found, one
// line each (an empty report: the store is consistent).
//
// On a store that can commit, the walk reads a committed view (readView):
// under the store's lock it only freezes a tree commit, checks the volume
// and branch tables (memory) and copies what the walk compares entries
// with; the walk itself, and meta's Check of the same view, run without
// the lock, so writers go on (a tree commit's freeze, the copy of the
// small state and the volume tables are all a writer waits for). The view's data space map then equals the
// chunks its tree references (a tree commit shows copies in flight as
// free), which meta's Check verifies. A read-only or failed store walks
// the live index under the lock and compares the live space map with the
// referenced chunks plus the copies in flight. A read-only store beside a
// live writer that committed since its Open reports that alone, one line.
func (s *Store) CheckReport() blockdev.CheckReport {
	rep, _ := s.checkReport()
	return rep
}

// checkReport is CheckReport, and the *StoreChangedError that replaced
// its findings, if any.
func (s *Store) checkReport() (blockdev.CheckReport, error) {
	rep := s.checkFindings()
	if rep.OK() {
		return rep, nil
	}
	// Before reporting corruption, a read-only store makes sure that no
	// writer changed the store under it (livero.go).
	if changed := s.changedUnder(); changed != nil {
		_ = s.fail(changed) // as a volume read does (livero.go)
		var only blockdev.CheckReport
		only.Addf("%v", changed)
		return only, changed
	}
	return rep, nil
}

// checkFindings runs the checks and lists what it found.
func (s *Store) checkFindings() blockdev.CheckReport {
	var rep blockdev.CheckReport
	bad := func(format string, args ...any) bool {
		rep.Addf(format, args...)
		return true // keep walking: report everything
	}
	s.checkSamples(bad) // identity.go
	var cs checkState
	var ctr counterBuilder
	bctr := branchChecker{cs: &cs}
	var tabs volTables
	ix, done, err := s.readViewCapture(func(c *capture) {
		cs = s.checkStateLocked()
		tabs = s.volTablesLocked(c)
		ctr.held, ctr.last = slices.Clone(s.b0.held), s.b0.lastEpoch
	}, true)
	if err != nil {
		bad("freeze for the check: %v", err)
		return rep
	}
	defer done()
	checkVolumes(tabs, &cs, bad)
	seen := make([]bool, s.geo.dataChunks)
	var prev entry
	first := true
	err = ix.ascend(entry{}, func(x entry) bool {
		if !first && !lessBCE(prev, x) {
			return bad("index out of order at (%d,%d,%d)", x.b, x.c, x.e)
		}
		first, prev = false, x
		br := cs.branches[x.b]
		switch {
		case br == nil:
			return bad("entry (%d,%d,%d) of missing branch", x.b, x.c, x.e)
		case x.c >= s.chunkBound(x.b):
			return bad("entry (%d,%d,%d) past the chunk space's %d chunks", x.b, x.c, x.e, s.chunkBound(x.b))
		case x.isData() && x.loc >= s.geo.dataChunks:
			return bad("entry (%d,%d,%d) at store chunk %d past the data region", x.b, x.c, x.e, x.loc)
		case x.e == 0 || x.e > br.lastEpoch && x.e != epochLive:
			return bad("entry (%d,%d,%d) at an epoch never handed out (last %d)", x.b, x.c, x.e, br.lastEpoch)
		case x.b == 0 && x.e == epochLive:
			return bad("origin entry (0,%d) at the live epoch", x.c)
		case !br.groups.mayHave(x.c) || x.b != 0 && !br.chainGroups.mayHave(x.c):
			return bad("entry (%d,%d,%d) missing from its branch summary", x.b, x.c, x.e)
		case x.b == 0 && cs.preservedBelow(x):
			return bad("origin chunk %d preserved below its entry at %d", x.c, x.e)
		}
		held := br.refs[x.e] > 0 || (x.e == epochLive && br.live)
		if !held && !cs.queued[point{x.b, x.e}] {
			return bad("entry (%d,%d,%d) at an epoch nothing holds and nothing collects", x.b, x.c, x.e)
		}
		if x.b == 0 {
			ctr.add(x, s.chunkLen(x.c))
		} else if err := bctr.add(ix, x); err != nil {
			return bad("counting entry (%d,%d,%d): %v", x.b, x.c, x.e, err)
		}
		if x.isData() {
			if seen[x.loc] {
				return bad("store chunk %d referenced twice (again by (%d,%d,%d))", x.loc, x.b, x.c, x.e)
			}
			seen[x.loc] = true
		}
		return true
	})
	if err != nil {
		_ = s.fail(metaErr("check: walk of the index", err))
		bad("walk of the index: %v", err)
	} else {
		want := ctr.finish(s.geo.originSize)
		checkCounters(&cs.ctr, &want, ctr.held, bad)
		bctr.check(&cs, bad)
	}
	var merr error
	if v, ok := ix.r.(*meta.View); ok {
		merr = v.Check()
	} else {
		s.checkAlloc(seen, bad)
		merr = s.m.Check()
	}
	if merr != nil {
		if ioErr := notCorrupt(merr); ioErr != nil {
			// A page that could not be read is a device failure, not
			// a finding: the store fails as it would in any lookup.
			_ = s.fail(metaErr("check", ioErr))
		}
		bad("metadata region: %v", merr)
	}
	return rep
}

// checkState is what the check's walk compares entries with: a copy taken
// under Store.mu at the instant of the index it walks.
type checkState struct {
	branches map[uint32]*checkBranch
	pres     *presCache
	queued   map[point]bool
	ctr      counters // the origin snapshots' counters
}

type checkBranch struct {
	lastEpoch           uint32
	live                bool
	refs                map[uint32]int32
	groups, chainGroups chunkGroups
	held                []uint32 // sorted epochs with refs > 0
	// parent and parentEpoch: the parent point (hasParent false: branch 0
	// or a root).
	parent, parentEpoch uint32
	hasParent           bool
	// root, liveVol and parentID are the branch's fields as they are, for
	// the volume table checks (checkVolumes): parentID is set whatever
	// the parent pointer says.
	root     bool
	liveVol  uint64
	parentID uint32
}

// preservedBelow reports whether origin entry x lies above its chunk's
// cached preserved epoch (an unknown one is looked up on use: nothing to
// compare).
func (cs *checkState) preservedBelow(x entry) bool {
	e, ok := cs.pres.known(x.c)
	return ok && e < x.e
}

// checkStateLocked copies the check's state. Called with Store.mu held.
func (s *Store) checkStateLocked() checkState {
	cs := checkState{branches: make(map[uint32]*checkBranch, len(s.branches)), pres: s.pres.clone(),
		queued: map[point]bool{}, ctr: s.ctr.clone()}
	// Branches share summary words until they differ (copy on write):
	// copy each set of words once.
	copies := map[*uint64]chunkGroups{}
	copyOf := func(g *chunkGroups) chunkGroups {
		k := &g.bits[0]
		c, ok := copies[k]
		if !ok {
			c = g.clone()
			copies[k] = c
		}
		return c
	}
	for id, br := range s.branches {
		cb := &checkBranch{lastEpoch: br.lastEpoch, live: br.live, refs: maps.Clone(br.refs),
			groups: copyOf(&br.groups), chainGroups: copyOf(&br.chainGroups), held: slices.Clone(br.held),
			root: br.root, liveVol: br.liveVol, parentID: br.parent}
		if br.up != nil {
			cb.parent, cb.parentEpoch, cb.hasParent = br.up.id, br.parentEpoch, true
		}
		cs.branches[id] = cb
	}
	for _, t := range s.gcq {
		cs.queued[t.p] = true
	}
	return cs
}

// notCorrupt returns the first of err's joined problems that is not
// meta.ErrCorrupt (a read that failed), or nil.
func notCorrupt(err error) error {
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		if !errors.Is(e, meta.ErrCorrupt) {
			return e
		}
	}
	return nil
}

// checkAlloc compares the data space map with the referenced chunks and
// the copies in flight: no chunk referenced and free, none allocated and
// neither referenced nor in flight (leaked).
func (s *Store) checkAlloc(seen []bool, bad func(string, ...any) bool) {
	a := s.alloc
	a.mu.Lock()
	defer a.mu.Unlock()
	used := make([]bool, len(seen))
	leaked := 0
	err := a.m.DataInUse(func(loc uint64) bool {
		if loc >= uint64(len(used)) {
			leaked++
			return true
		}
		used[loc] = true
		if _, inflight := a.inflight[loc]; !seen[loc] && !inflight {
			leaked++
		}
		return true
	})
	if err != nil {
		bad("the data space map could not be read: %v", err)
		return
	}
	if leaked > 0 {
		bad("%d store chunks allocated but neither referenced nor in flight: leaked", leaked)
	}
	for loc, ref := range seen {
		if ref && !used[loc] {
			bad("store chunk %d referenced but free in the space map", loc)
		}
	}
}

// volTables is what checkVolumes compares the branch copies (checkState)
// with: the volume, name and point tables, copied under Store.mu at the
// instant of the index the check walks. The comparisons, a few map
// lookups per volume (4-8 ms with 10,000 snapshots), then run without the
// lock, which the writer waited for (docs/metadata.md section 24); the
// copy is the capture's volume records, made under the same hold anyway,
// and two map clones.
type volTables struct {
	vols                    []volRec // every volume but the origin (the capture's: read only)
	origin                  volRec
	byName                  map[string]uint64
	byPoint                 map[point]uint64
	originSize, volumeBound int64
	noOrigin                bool
}

// volTablesLocked copies the volume tables for checkVolumes, taking the
// volume records from c (the capture made under the same hold) when there
// is one. Called with Store.mu held.
func (s *Store) volTablesLocked(c *capture) volTables {
	t := volTables{byName: maps.Clone(s.byName), byPoint: maps.Clone(s.byPoint),
		originSize: s.geo.originSize, volumeBound: s.geo.volumeBound(), noOrigin: s.geo.noOrigin}
	if c != nil {
		t.vols = c.volumes
	} else {
		t.vols = s.makeVolRecs() // mu may be held shared: no cache
	}
	o := s.origVol
	t.origin = volRec{id: int64(o.id), name: o.name, kind: o.kind, branch: o.branch, epoch: o.epoch,
		hidden: o.hidden, size: o.size.Load()}
	return t
}

// checkVolumes checks the volume tables against each other and against
// the branches' holds. It reads only copies (t, cs), so it runs without
// the store's lock.
func checkVolumes(t volTables, cs *checkState, bad func(string, ...any) bool) {
	vols := append(slices.Clone(t.vols), t.origin)
	refs := map[point]int32{}
	ids := make(map[uint64]bool, len(vols))
	for _, v := range vols {
		ids[uint64(v.id)] = true
	}
	for _, v := range vols {
		id := uint64(v.id)
		br := cs.branches[v.branch]
		if br == nil {
			bad("volume %d on missing branch %d", id, v.branch)
			continue
		}
		switch v.kind {
		case KindSnapshot:
			if v.epoch == 0 || v.epoch > br.lastEpoch {
				bad("snapshot %d at epoch %d of branch %d (last %d)", id, v.epoch, v.branch, br.lastEpoch)
			}
			if t.byPoint[point{v.branch, v.epoch}] != id {
				bad("snapshot %d missing from the point table", id)
			}
			if !v.hidden {
				refs[point{v.branch, v.epoch}]++
			}
		case KindClone:
			if !br.live || br.liveVol != id {
				bad("clone %d on branch %d that is not live for it", id, v.branch)
			}
		}
		checkSize(v, t.originSize, t.volumeBound, bad)
		if !v.hidden && !(v.kind == KindOrigin && t.noOrigin) {
			if t.byName[v.name] != id {
				bad("volume %d (%q) missing from the name table", id, v.name)
			}
		}
	}
	for id, br := range cs.branches {
		if id == 0 {
			continue
		}
		if br.root {
			if br.live && !ids[br.liveVol] {
				bad("live root branch %d without its volume", id)
			}
			continue
		}
		if cs.branches[br.parentID] == nil {
			bad("branch %d of missing parent %d", id, br.parentID)
			continue
		}
		refs[point{br.parentID, br.parentEpoch}]++
		if br.live && !ids[br.liveVol] {
			bad("live branch %d without its clone volume", id)
		}
	}
	for id, br := range cs.branches {
		for e, n := range br.refs {
			if refs[point{id, e}] != n {
				bad("branch %d epoch %d held %d times, want %d", id, e, n, refs[point{id, e}])
			}
		}
		for _, e := range br.held {
			if br.refs[e] <= 0 {
				bad("branch %d epoch %d in the held list without holders", id, e)
			}
		}
	}
	for p, n := range refs {
		br := cs.branches[p.b]
		if br != nil && br.refs[p.e] != n {
			bad("branch %d epoch %d held %d times, want %d", p.b, p.e, br.refs[p.e], n)
		}
	}
	for _, v := range vols {
		br := cs.branches[v.branch]
		if v.hidden && br != nil && br.refs[v.epoch] <= 0 && !cs.queued[point{v.branch, v.epoch}] {
			bad("hidden snapshot %d without clones", v.id)
		}
	}
}
