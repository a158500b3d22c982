package snapshot

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Kind is the kind of a volume.
type Kind uint8

const (
	// KindOrigin is the live origin volume (branch 0).
	KindOrigin Kind = iota
	// KindSnapshot is a read-only snapshot of the origin or of a clone.
	KindSnapshot
	// KindClone is a writable clone of a snapshot.
	KindClone
	// KindVolume is a writable volume with no parent: made blank by
	// CreateVolume or filled by Import. It is a clone of nothing, and every
	// operation treats it as a clone (its snapshots, their clones, Rollback,
	// Resize, Delete). Only VolumeInfo and Volume.Kind report it; the
	// metadata records it as a clone on a root branch.
	KindVolume
)

func (k Kind) String() string {
	switch k {
	case KindOrigin:
		return "origin"
	case KindSnapshot:
		return "snapshot"
	case KindClone:
		return "clone"
	case KindVolume:
		return "volume"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// level is one step of a read's resolution: a branch seen at an epoch.
type level struct {
	br *branch
	e  uint32
}

// branch is a writable line of history: the origin (id 0) or a clone.
//
// A branch costs memory independent of its depth: its clone ancestry is
// the up pointers (resolution orders are built from them when a volume
// handle opens), and its summaries share their words until they differ.
// The fields that change are guarded by Store.mu, but need and gate.
type branch struct {
	id          uint32
	parent      uint32  // parent branch (clones)
	parentEpoch uint32  // the parent's snapshot this branch was cloned from
	up          *branch // the parent branch (nil for branch 0 and roots)
	depth       int     // clone levels above the chain's root (0 for a root)
	// root: a branch with no parent, made by CreateVolume (parent and
	// parentEpoch are 0 and mean nothing). A chunk that no level of a chain
	// ending at a root maps reads as zeros, not from the origin.
	root      bool
	live      bool   // the branch's live volume exists (always true for 0)
	liveVol   uint64 // the clone volume's id
	lastEpoch uint32 // last snapshot number handed out
	refs      map[uint32]int32
	held      []uint32 // sorted epochs with refs > 0
	// groups summarises the chunks the branch has entries for. Until its
	// first entry it shares branch 0's chainGroups, which is never set (branch
	// 0 is no clone), so an empty branch costs no words; ownGroups says the
	// words are the branch's own.
	groups    chunkGroups
	ownGroups bool
	// groupsCaptured: a tree commit's capture shares the own words (it
	// encodes them without the lock), so the next bit set copies them.
	groupsCaptured bool
	// chainGroups is the union of groups over this branch and its clone
	// ancestors (branch 0 excluded): a clear bit sends a read straight to
	// branch 0's level, whatever the depth. Bits only get set; a set bit
	// here is set in every descendant's too. Unless ownChain, the words are
	// the parent's (or, for a clone of branch 0, the never-set empty
	// summary): a branch copies them only when its own entries add a bit
	// its parent's union lacks, so a chain of N clones costs N summaries
	// only where N levels wrote somewhere new.
	chainGroups chunkGroups
	ownChain    bool
	children    []*branch

	// need is the newest held epoch (0: none); written under Store.mu and
	// gate, read atomically on the write path.
	need atomic.Uint32

	// gate: writers hold it shared for the duration of a write; creating or
	// deleting a snapshot of the branch holds it exclusively, so a write is
	// wholly before or wholly after the snapshot point.
	gate sync.RWMutex
}

// volume is a named volume's metadata. Guarded by Store.mu.
type volume struct {
	id     uint64
	name   string
	kind   Kind
	branch uint32
	epoch  uint32 // snapshots; epochLive for clones and the origin
	hidden bool   // a deleted snapshot kept as a clone's parent point
	// protected refuses Delete (Protect); persisted in the checkpoint
	// with hidden, as bit 1 of the same field.
	protected bool
	created   int64
	parent    uint64
	dead      atomic.Bool // deleted: handles fail
	// size is the volume's size in bytes: written under Store.mu (and, for
	// a clone, its branch gate held exclusively), read atomically by the
	// I/O paths' bounds checks.
	size atomic.Int64
}

// point is a snapshot of a branch.
type point struct {
	b uint32
	e uint32
}

// newestHeldBelow returns the greatest held epoch in (lo, hi), or 0.
func (br *branch) newestHeldBelow(lo, hi uint32) uint32 {
	i, _ := slices.BinarySearch(br.held, hi) // first >= hi
	if i == 0 {
		return 0
	}
	if h := br.held[i-1]; h > lo {
		return h
	}
	return 0
}

func (br *branch) ref(e uint32, d int32) (nowZero bool) {
	old := br.refs[e]
	n := old + d
	if n <= 0 {
		delete(br.refs, e)
		if i, ok := slices.BinarySearch(br.held, e); ok {
			br.held = slices.Delete(br.held, i, i+1)
		}
	} else {
		br.refs[e] = n
		if old <= 0 {
			i, _ := slices.BinarySearch(br.held, e)
			br.held = slices.Insert(br.held, i, e)
		}
	}
	var need uint32
	if len(br.held) > 0 {
		need = br.held[len(br.held)-1]
	}
	br.need.Store(need)
	return n <= 0
}

// dead reports whether nothing needs the branch any more.
func (br *branch) dead() bool { return br.id != 0 && !br.live && len(br.held) == 0 }

func (s *Store) newBranch(id, parent, pe uint32) *branch {
	br := &branch{id: id, parent: parent, parentEpoch: pe, live: true, refs: map[uint32]int32{}}
	if id == 0 {
		br.groups, br.ownGroups = newChunkGroups(s.chunks), true
		br.chainGroups = newChunkGroups(s.maxChunks) // the shared empty summary, over the whole chunk space
		return br
	}
	p := s.branches[parent]
	empty := s.branches[0].chainGroups
	br.up, br.depth = p, p.depth+1
	br.groups = empty
	br.chainGroups = empty
	if parent != 0 {
		br.chainGroups = p.chainGroups
	}
	p.children = append(p.children, br)
	return br
}

// chainLevels appends the resolution order below br, the levels a read of
// br falls through to: br's parent at the epoch br was cloned from, its
// parent at its own, and so on to branch 0. Nothing is allocated when dst
// has room for br.depth levels.
func (br *branch) chainLevels(dst []level) []level {
	for b := br; b.up != nil; b = b.up {
		dst = append(dst, level{br: b.up, e: b.parentEpoch})
	}
	return dst
}

// levelsOf returns the resolution order of branch br seen at epoch e:
// (br, e), then br.chainLevels.
func levelsOf(br *branch, e uint32) []level {
	return br.chainLevels(append(make([]level, 0, br.depth+1), level{br: br, e: e}))
}

// applyOps applies a transaction's operations to the index and the
// in-memory state. It is the one place state changes, live or in replay,
// so the two agree. With replay set, the chunks of data puts are claimed
// in the data space map; otherwise they are adopted from the in-flight
// allocations. Freed chunks are held by the metadata layer until a tree
// commit covering the free is durable. Called with s.mu held.
func (s *Store) applyOps(ops []op, seq uint64, replay bool) error {
	for i := range ops {
		if err := s.applyOp(&ops[i], seq, replay); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) applyOp(o *op, seq uint64, replay bool) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: record %d: %s", ErrCorrupt, seq, fmt.Sprintf(format, args...))
	}
	switch o.kind {
	case opPut, opDel, opMove, opBranch, opDropBranch: // no volume's record changes
	case opVolume, opHide, opDropVolume, opRename, opProtect, opCreate, opResize:
		// The next capture patches the record; past a bound (no capture
		// for long, as in a store with no journal) it makes them all.
		if len(s.volChanged) < maxVolChanged {
			s.volChanged = append(s.volChanged, o.id)
		} else {
			s.volAll = true
		}
	default:
		s.volAll = true // not a known operation: the next capture makes every record
	}
	switch o.kind {
	case opPut, opDel:
		br := s.branches[o.b]
		if br == nil {
			return bad("entries of unknown branch %d", o.b)
		}
		if lim := s.chunkBound(o.b); o.c+o.n > lim || o.c+o.n < o.c {
			return bad("chunks %d+%d past the end (%d)", o.c, o.n, lim)
		}
		if o.kind == opPut {
			return s.applyPut(br, o, replay, bad)
		}
		if o.b == 0 {
			s.countChange(o.e)
		}
		for i := uint64(0); i < o.n; i++ {
			x, ok, err := s.ix.del(o.b, o.c+i, o.e)
			if err != nil {
				return metaErr("index delete", err)
			}
			if !ok {
				return bad("delete of missing entry (%d,%d,%d)", o.b, o.c+i, o.e)
			}
			if o.b != 0 {
				if err := s.countBranchEntry(br, x, -1); err != nil {
					return err
				}
			}
			if x.isData() {
				free := s.m.FreeData
				if s.migrating {
					// A version 1 store reused a freed chunk once the record
					// freeing it was durable, so a later record of its tail
					// may reference it again: free it at once (nothing of the
					// new store is durable yet).
					free = s.m.ReturnData
				}
				if err := free(x.loc); err != nil {
					if !errors.Is(err, meta.ErrInvalid) {
						// The layer failed (a device error): not the record's fault.
						return metaErr("free of a store chunk", err)
					}
					return bad("entry (%d,%d,%d) frees store chunk %d: %v", o.b, o.c+i, o.e, x.loc, err)
				}
			}
		}
	case opMove:
		if o.b == 0 {
			s.countChange(o.e)
		}
		x, ok, err := s.ix.del(o.b, o.c, o.e)
		if err != nil {
			return metaErr("index delete", err)
		}
		if !ok {
			return bad("move of missing entry (%d,%d,%d)", o.b, o.c, o.e)
		}
		if br := s.branches[o.b]; o.b != 0 && br != nil {
			if err := s.moveBranchEntry(br, x, o.e2); err != nil {
				return err
			}
		}
		x.e = o.e2
		if ok, err := s.ix.put(x); err != nil || !ok {
			if err != nil {
				return metaErr("index put", err)
			}
			return bad("move onto existing entry (%d,%d,%d)", o.b, o.c, o.e2)
		}
	case opBranch:
		p := s.branches[o.b]
		if p == nil || s.branches[uint32(o.id)] != nil || o.id > 0xffffffff || o.id == 0 {
			return bad("branch %d of parent %d", o.id, o.b)
		}
		if o.e == 0 || o.e > p.lastEpoch {
			return bad("branch %d cloned from epoch %d of branch %d (last %d)", o.id, o.e, o.b, p.lastEpoch)
		}
		s.branches[uint32(o.id)] = s.newBranch(uint32(o.id), o.b, o.e)
		if _, err := s.refAt(p, o.e, 1); err != nil {
			return err
		}
		if uint32(o.id) >= s.nextBranch {
			s.nextBranch = uint32(o.id) + 1
		}
	case opDropBranch:
		br := s.branches[uint32(o.id)]
		if br == nil || !br.dead() {
			return bad("drop of branch %d that is missing or still needed", o.id)
		}
		delete(s.branches, br.id)
		delete(s.ctr.br, br.id)
		if br.root {
			return nil
		}
		if p := s.branches[br.parent]; p != nil {
			p.children = slices.DeleteFunc(p.children, func(x *branch) bool { return x == br })
		}
		if p := s.branches[br.parent]; p != nil {
			zero, err := s.refAt(p, br.parentEpoch, -1)
			if err != nil {
				return err
			}
			if zero {
				s.queueGC(point{p.id, br.parentEpoch})
			}
		}
	case opVolume:
		return s.applyVolume(o, bad)
	case opHide, opDropVolume:
		v := s.volumes[o.id]
		if v == nil || v.kind == KindOrigin || (o.kind == opHide && (v.kind != KindSnapshot || v.hidden)) {
			return bad("%v of volume %d", o.kind, o.id)
		}
		s.removeName(v)
		if o.kind == opHide {
			v.hidden = true
			_, err := s.refAt(s.branches[v.branch], v.epoch, -1)
			return err
		}
		return s.dropVolume(v)
	case opRename:
		v := s.volumes[o.id]
		if v == nil || v.hidden {
			return bad("rename of volume %d", o.id)
		}
		if _, taken := s.byName[o.name]; taken {
			return bad("rename onto existing name %q", o.name)
		}
		s.removeName(v)
		v.name = o.name
		s.byName[o.name] = v.id
	case opProtect:
		v := s.volumes[o.id]
		if v == nil || v.hidden || v.kind == KindOrigin {
			return bad("protect of volume %d", o.id)
		}
		v.protected = o.on
	case opCreate, opResize:
		return s.applyPoolOp(o, bad)
	default:
		return bad("operation %d", o.kind)
	}
	return nil
}

func (s *Store) applyPut(br *branch, o *op, replay bool, bad func(string, ...any) error) error {
	if o.loc < locInherit && o.loc+o.n > s.geo.dataChunks {
		return bad("location %d+%d past the data region", o.loc, o.n)
	}
	if s.migrating {
		s.ctr.stale = true // Migrate rebuilds them at the new store's Open
	}
	for i := uint64(0); i < o.n; i++ {
		x := entry{b: o.b, e: o.e, c: o.c + i, loc: o.loc}
		if br.id == 0 {
			if err := s.countPut(x.c, o.e, o.loc < locInherit); err != nil {
				return err
			}
		}
		if o.loc < locInherit {
			x.loc = o.loc + i
			if replay && !s.alloc.mark(x.loc) {
				return bad("store chunk %d referenced twice", x.loc)
			}
		}
		if ok, err := s.ix.put(x); err != nil || !ok {
			if err != nil {
				return metaErr("index put", err)
			}
			return bad("put of existing entry (%d,%d,%d)", x.b, x.c, x.e)
		}
		if br.id != 0 {
			if err := s.countBranchEntry(br, x, 1); err != nil {
				return err
			}
		}
		if br.id == 0 {
			s.pres.raise(x.c, o.e)
		}
	}
	markGroups(br, o.c, o.n)
	if o.loc < locInherit && !replay {
		s.alloc.adopt(o.loc, o.n)
	}
	return nil
}

func (s *Store) applyVolume(o *op, bad func(string, ...any) error) error {
	br := s.branches[o.b]
	if br == nil || s.volumes[o.id] != nil || o.id == 0 {
		return bad("volume %d on branch %d", o.id, o.b)
	}
	if _, taken := s.byName[o.name]; taken && !o.hidden {
		return bad("volume %d: name %q taken", o.id, o.name)
	}
	v := &volume{id: o.id, name: o.name, kind: o.vkind, branch: o.b, epoch: o.e, hidden: o.hidden, created: o.time, parent: o.parent}
	v.size.Store(s.inheritedSize(br, o.vkind))
	switch o.vkind {
	case KindSnapshot:
		if o.e <= br.lastEpoch || o.e == epochLive {
			return bad("snapshot %d at epoch %d of branch %d (last %d)", o.id, o.e, o.b, br.lastEpoch)
		}
		br.lastEpoch = o.e
		s.byPoint[point{o.b, o.e}] = v.id
		if !o.hidden {
			if _, err := s.refAt(br, o.e, 1); err != nil {
				return err
			}
		}
	case KindClone:
		if br.liveVol != 0 || o.e != epochLive {
			return bad("clone volume %d on branch %d", o.id, o.b)
		}
		br.liveVol = v.id
	default:
		return bad("volume kind %v", o.vkind)
	}
	s.volumes[v.id] = v
	if !o.hidden {
		s.byName[v.name] = v.id
	}
	if v.id >= s.nextVol {
		s.nextVol = v.id + 1
	}
	return nil
}

func (s *Store) removeName(v *volume) {
	if id, ok := s.byName[v.name]; ok && id == v.id && !v.hidden {
		delete(s.byName, v.name)
	}
}

// dropVolume forgets a deleted snapshot or clone and queues the collection
// of what only it needed.
func (s *Store) dropVolume(v *volume) error {
	br := s.branches[v.branch]
	delete(s.volumes, v.id)
	v.dead.Store(true)
	switch v.kind {
	case KindSnapshot:
		delete(s.byPoint, point{v.branch, v.epoch})
		if !v.hidden {
			if _, err := s.refAt(br, v.epoch, -1); err != nil {
				return err
			}
		}
		if br.refs[v.epoch] <= 0 {
			s.queueGC(point{v.branch, v.epoch})
		}
	case KindClone:
		br.live = false
		br.liveVol = 0
		s.liveRemoved(br)
		s.queueGC(point{v.branch, epochLive})
	}
	return nil
}

// queueGC asks the collector to look at the entries of p, whose epoch no
// longer holds anything.
func (s *Store) queueGC(p point) {
	s.gcq = append(s.gcq, gcTask{p: p})
	select {
	case s.gcKick <- struct{}{}:
	default:
	}
}

// markGroups sets the summary bits of chunks [c, c+n) in br and, for a
// clone branch, in the chain summaries of br and its descendants.
func markGroups(br *branch, c, n uint64) {
	g := &br.groups
	for i := c >> g.shift; i <= (c+n-1)>>g.shift; i++ {
		if g.has(i) {
			continue
		}
		if !br.ownGroups || br.groupsCaptured {
			// The words are shared: the empty summary (all clear), or
			// a capture's (smallStateLocked).
			*g, br.ownGroups, br.groupsCaptured = g.clone(), true, false
		}
		g.setBit(i)
		if br.id != 0 {
			markChain(br, i)
		}
	}
}

// markChain sets bit i of br's chain summary, copying the words first if
// they are shared, and spreads the bit to the descendants.
func markChain(br *branch, i uint64) {
	if br.chainGroups.has(i) {
		return // and so do all descendants
	}
	if !br.ownChain {
		br.chainGroups, br.ownChain = br.chainGroups.clone(), true
	}
	br.chainGroups.setBit(i)
	for _, ch := range br.children {
		spreadChain(ch, i)
	}
}

// spreadChain tells br that its parent's chain summary gained bit i: a
// branch sharing the parent's words takes them again (they may be a new
// copy) and passes the news on; one with its own words sets the bit.
func spreadChain(br *branch, i uint64) {
	if br.ownChain {
		markChain(br, i)
		return
	}
	br.chainGroups = br.up.chainGroups
	for _, ch := range br.children {
		spreadChain(ch, i)
	}
}
