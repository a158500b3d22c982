package snapshot

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// VolumeInfo describes a volume.
type VolumeInfo struct {
	ID uint64
	// UUID is the volume's stable identity (see UUID).
	UUID   UUID
	Name   string
	Kind   Kind
	Parent uint64 // snapshot: the volume it was taken of; clone: the snapshot it was cloned from (0 for the origin and blank volumes)
	// ParentName is the parent's name: empty when there is no parent and
	// when the parent is hidden (a hidden volume has no name; Parent still
	// says which it is).
	ParentName string
	Created    time.Time
	// Size is the volume's size in bytes (Volume.Size).
	Size int64
	// Hidden: a snapshot kept only as the parent point of clones (taken
	// implicitly by CreateClone of a live volume, or deleted while clones
	// needed it). It has no name, cannot be opened, and goes when its last
	// clone does. Only ListAll returns hidden volumes.
	Hidden bool
	// Protected: Delete refuses the volume until Unprotect.
	Protected bool
}

// VolumeStat is a volume's space accounting, in the manner of thin_ls
// (docs/metadata.md section 15 defines it exactly). Mapped counts the bytes
// whose data this volume reads from the store (for the origin: from the
// origin device); Exclusive those no other volume reads (a clone taken of
// a snapshot reads what the snapshot reads); Shared the rest, which
// includes everything a clone reads through its parent. For the origin,
// Shared is what a snapshot still reads from the origin device.
type VolumeStat struct {
	VolumeInfo
	Mapped, Exclusive, Shared int64
}

func validName(name string) error { return ValidName(name) }

// writableBranch returns v's branch if v is the origin or a live clone.
func (v *Volume) writable() error {
	if v.kind == KindSnapshot {
		return fmt.Errorf("%w: volume %d is a snapshot", ErrReadOnly, v.meta.id)
	}
	if err := v.s.writable(); err != nil {
		return err
	}
	return v.check(0, 0)
}

// quiesce is called with br's gate held exclusively: it makes every write
// completed on the branch durable, so the snapshot being taken can never
// change after a crash.
func (s *Store) quiesce(br *branch) error {
	if s.j == nil {
		return nil
	}
	if br.id == 0 {
		if err := s.drainOrigin(s.ctx, false); err != nil {
			return err
		}
		if err := s.origin.Flush(); err != nil {
			return fmt.Errorf("snapshot: flush origin: %w", err)
		}
		return nil
	}
	return s.store.Flush()
}

// CreateSnapshot takes a read-only snapshot, named name, of the origin or of
// a clone. O(1): no data is copied. Every write completed before the call
// is in the snapshot, and durable when it returns.
func (s *Store) CreateSnapshot(name string, of *Volume) (*Volume, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if err := of.writable(); err != nil {
		return nil, err
	}
	br := of.br
	br.gate.Lock()
	defer br.gate.Unlock()
	if err := of.notDeleted(); err != nil { // Delete marks it dead under the gate
		return nil, err
	}
	if err := s.quiesce(br); err != nil {
		return nil, err
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if err := s.makeLogRoom(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if _, taken := s.byName[name]; taken {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	id := s.nextVol
	sc.ops = append(sc.ops, op{kind: opVolume, id: id, vkind: KindSnapshot, b: br.id, e: br.lastEpoch + 1,
		time: time.Now().UnixNano(), parent: of.meta.id, name: name})
	_, err := s.logLocked(sc)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := s.commit(s.ctx); err != nil {
		return nil, err
	}
	return s.OpenID(id)
}

// CreateClone makes a writable clone, named name, of a snapshot; or of the
// live origin or a clone, through an implicit hidden snapshot taken now.
// O(1): no data is copied.
func (s *Store) CreateClone(name string, from *Volume) (*Volume, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if err := from.check(0, 0); err != nil {
		return nil, err
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	now := time.Now().UnixNano()
	parentPoint := point{from.br.id, from.meta.epoch}
	if from.kind != KindSnapshot {
		from.br.gate.Lock()
		defer from.br.gate.Unlock()
		if err := from.notDeleted(); err != nil { // Delete marks it dead under the gate
			return nil, err
		}
		if err := s.quiesce(from.br); err != nil {
			return nil, err
		}
	}
	if err := s.makeLogRoom(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	// A snapshot is deleted (dropped or hidden) under mu, without its
	// branch gate: look again now, before its epoch is referenced.
	if v := s.volumes[from.meta.id]; v != from.meta || v.hidden || v.dead.Load() {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: volume %d", ErrInvalidSnapshot, from.meta.id)
	}
	if _, taken := s.byName[name]; taken {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	parentVol := from.meta.id
	id := s.nextVol
	if from.kind != KindSnapshot {
		parentPoint.e = from.br.lastEpoch + 1
		sc.ops = append(sc.ops, op{kind: opVolume, id: id, vkind: KindSnapshot, b: from.br.id, e: parentPoint.e,
			hidden: true, time: now, parent: from.meta.id, name: ""})
		parentVol = id
		id++
	}
	bid := uint64(s.nextBranch)
	sc.ops = append(sc.ops,
		op{kind: opBranch, id: bid, b: parentPoint.b, e: parentPoint.e},
		op{kind: opVolume, id: id, vkind: KindClone, b: uint32(bid), e: epochLive, time: now, parent: parentVol, name: name})
	_, err := s.logLocked(sc)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := s.commit(s.ctx); err != nil {
		return nil, err
	}
	return s.OpenID(id)
}

// Rename gives a volume a new name.
func (s *Store) Rename(oldName, newName string) error {
	if err := validName(newName); err != nil {
		return err
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if err := s.makeLogRoom(); err != nil {
		return err
	}
	s.mu.Lock()
	id, ok := s.byName[oldName]
	switch {
	case !ok:
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNotFound, oldName)
	case id == originVolumeID:
		s.mu.Unlock()
		return fmt.Errorf("%w: the origin cannot be renamed", ErrBadOptions)
	}
	if _, taken := s.byName[newName]; taken {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrExists, newName)
	}
	sc.ops = append(sc.ops, op{kind: opRename, id: id, name: newName})
	_, err := s.logLocked(sc)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	return s.commit(s.ctx)
}

func (s *Store) infoLocked(v *volume) VolumeInfo {
	created := time.Unix(0, v.created)
	info := VolumeInfo{ID: v.id, UUID: s.volumeUUID(v), Name: v.name, Kind: kindOf(v, s.branches[v.branch]), Parent: v.parent,
		Created: created, Size: v.size.Load(), Hidden: v.hidden, Protected: v.protected}
	if p, ok := s.volumes[v.parent]; ok && v.parent != 0 && p != v {
		info.ParentName = p.name
	}
	return info
}

// List returns every visible volume (the origin first), ordered by ID.
func (s *Store) List() []VolumeInfo {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]VolumeInfo, 0, len(s.byName))
	for _, id := range s.byName {
		out = append(out, s.infoLocked(s.volumes[id]))
	}
	slices.SortFunc(out, func(a, b VolumeInfo) int {
		if a.ID < b.ID {
			return -1
		}
		return 1
	})
	return out
}

// Info returns the volume's description.
func (v *Volume) Info() VolumeInfo {
	v.s.mu.RLock()
	defer v.s.mu.RUnlock()
	return v.s.infoLocked(v.meta)
}

// Stat returns the named volume's space accounting (docs/metadata.md
// section 15 defines it), from counters kept as entries change: the
// origin's and its snapshots' in O(log snapshots), a clone's, a blank
// volume's or one of their snapshots' in O(depth x log snapshots) plus one
// seek per level of its chain. A volume smaller than what its chain maps
// (shrunk, or a clone smaller than its origin), or a store whose counters
// are being rebuilt, walks the index entries of the volume's branch and
// its ancestors (metadata only) on a committed view of the index
// (readView) instead, so the walk does not hold the store's lock and
// writers go on meanwhile; the answer is the state at the call's start.
func (s *Store) Stat(name string) (VolumeStat, error) {
	s.mu.RLock()
	if id, ok := s.byName[name]; ok {
		st, ok, err := s.countedStatLocked(s.volumes[id])
		if ok || err != nil {
			s.mu.RUnlock()
			return st, err
		}
	}
	s.mu.RUnlock()
	return s.statWalk(name)
}

// countedStatLocked is Stat from the counters; ok false: they cannot
// answer for v (not maintained, or a clone smaller than what its chain
// maps), and Stat walks. Called with Store.mu held.
func (s *Store) countedStatLocked(v *volume) (st VolumeStat, ok bool, err error) {
	switch {
	case v.kind == KindOrigin:
		return s.originStatLocked(v), true, nil
	case v.kind == KindSnapshot && v.branch == 0 && !s.ctr.stale:
		return s.snapshotStatLocked(v), true, nil
	case v.branch != 0:
		return s.cloneStatLocked(v)
	}
	return st, false, nil
}

// statWalk is Stat by a walk of the entries the volume reads: what clones
// and their snapshots use, and the oracle that the counters are tested
// against.
func (s *Store) statWalk(name string) (VolumeStat, error) { return s.statWalkAt(name, nil) }

// statWalkAt is statWalk; at, if not nil, is called with Store.mu held at the moment the
// walk's view and holders are taken (not for the origin, which is not
// walked): the oracle's test reads the counters there, since a
// collection between two separate reads may change the answer (dropping a
// deleted clone's branch releases its hold on its parent point).
func (s *Store) statWalkAt(name string, at func(v *volume)) (VolumeStat, error) {
	var st VolumeStat
	var levels []viewLevel
	var h holders
	found := false
	ix, done, err := s.readView(func() {
		id, ok := s.byName[name]
		if !ok {
			return
		}
		found = true
		v := s.volumes[id]
		if v.kind == KindOrigin {
			st = s.originStatLocked(v)
			return
		}
		st.VolumeInfo = s.infoLocked(v)
		br := s.branches[v.branch]
		levels = viewLevels(levelsOf(br, v.epoch))
		h = holdersOf(br)
		if at != nil {
			at(v)
		}
	}, false)
	if err != nil {
		return VolumeStat{}, err
	}
	defer done()
	if !found {
		return VolumeStat{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	// The volume's own level is one pass, chunk by chunk: the entry its
	// epoch reads (the first at or above it) and the one before it, which
	// bound who else reads it, come from the walk, not from lookups. A
	// chunk first met at a deeper level has no entry above that level.
	// Only chunks within the volume's size count: entries past it (an
	// ancestor's larger size, a shrink's tail) are never read through it.
	vc := uint64((st.Size + s.cs - 1) / s.cs)
	seen := make([]uint64, (vc+63)/64)
	count := func(c, loc uint64, excl bool) {
		if loc == locZero {
			return
		}
		n := s.volChunkLen(c, st.Size)
		st.Mapped += n
		if excl {
			st.Exclusive += n
		} else {
			st.Shared += n
		}
	}
	var group []entry
	chunk := func() error {
		c := group[0].c
		if c >= vc {
			return nil
		}
		seen[c/64] |= 1 << (c % 64)
		for j, x := range group {
			if x.e < levels[0].e {
				continue
			}
			if x.loc == locInherit {
				break
			}
			lo := uint32(0)
			if j > 0 {
				lo = group[j-1].e
			}
			count(c, x.loc, h.readers(lo, x.e) == 1)
			return nil
		}
		loc, fromOrigin, err := resolveIn(ix, levels[1:], c)
		if err == nil && !fromOrigin {
			count(c, loc, false)
		}
		return err
	}
	var lerr error
	err = ix.branchAscend(levels[0].b, func(x entry) bool {
		if len(group) > 0 && group[0].c != x.c {
			if lerr = chunk(); lerr != nil {
				return false
			}
			group = group[:0]
		}
		group = append(group, x)
		return true
	})
	if err == nil && lerr == nil && len(group) > 0 {
		lerr = chunk()
	}
	if err = errors.Join(err, lerr); err != nil {
		return VolumeStat{}, metaErr("stat", err)
	}
	for i := 1; i < len(levels); i++ {
		err := ix.branchAscend(levels[i].b, func(x entry) bool {
			if x.c >= vc || seen[x.c/64]&(1<<(x.c%64)) != 0 {
				return true
			}
			seen[x.c/64] |= 1 << (x.c % 64)
			loc, fromOrigin, err := resolveIn(ix, levels[i:], x.c)
			if err != nil {
				lerr = err
				return false
			}
			if !fromOrigin {
				count(x.c, loc, false)
			}
			return true
		})
		if err = errors.Join(err, lerr); err != nil {
			return VolumeStat{}, metaErr("stat", err)
		}
	}
	return st, nil
}

// originStatLocked is the origin's Stat: a chunk is shared while a
// snapshot still needs its preserved copy (the snapshot reads it from the
// origin). O(log snapshots), from the counters. Called with Store.mu held.
func (s *Store) originStatLocked(v *volume) VolumeStat {
	st := VolumeStat{VolumeInfo: s.infoLocked(v), Mapped: s.geo.originSize}
	need := s.b0.need.Load()
	if !s.ctr.stale {
		st.Shared = s.ctr.pres.sum(need)
	} else { // a pass over the chunks, looking up those not known
		for c := uint64(0); c < s.chunks; c++ {
			if pe, err := s.preservedOf(c); err != nil || need > pe {
				st.Shared += s.chunkLen(c) // unreadable: counted as the snapshot's, not the origin's
			}
		}
	}
	st.Exclusive = st.Mapped - st.Shared
	return st
}

// viewLevel is a level of a volume's chain as copied for a reader of a
// view: the branch by id, since the branch itself may change meanwhile.
type viewLevel struct {
	b, e uint32
}

// viewLevels copies levels for a reader of a view. Called with Store.mu
// held.
func viewLevels(levels []level) []viewLevel {
	out := make([]viewLevel, len(levels))
	for i, l := range levels {
		out[i] = viewLevel{b: l.br.id, e: l.e}
	}
	return out
}

// resolveIn is resolveLocked on a view: where chunk c lives as levels
// sees it. It looks every level up, since the branches' summaries are
// live state that the caller does not hold.
func resolveIn(ix pagedIndex, levels []viewLevel, c uint64) (loc uint64, fromOrigin bool, err error) {
	for _, l := range levels {
		var x entry
		var ok bool
		if l.e == epochLive {
			x, ok, err = ix.get(l.b, c, epochLive)
		} else {
			x, ok, err = ix.seek(l.b, c, l.e)
		}
		if err != nil {
			return 0, false, metaErr("index lookup", err)
		}
		if ok && x.loc != locInherit {
			return x.loc, false, nil
		}
	}
	return 0, true, nil
}

// holders is a branch's held epochs, with their reference counts, and
// whether its live volume exists: a copy taken under Store.mu, for a
// reader that walks a view after the lock is released.
type holders struct {
	b    uint32
	held []uint32
	refs []int32 // refs[i] is held[i]'s count
	live bool
}

func holdersOf(br *branch) holders {
	h := holders{b: br.id, held: slices.Clone(br.held), refs: make([]int32, len(br.held)), live: br.live}
	for i, e := range br.held {
		h.refs[i] = br.refs[e]
	}
	return h
}

// readers returns how many volumes read an entry at epoch e of the branch
// whose previous entry for the chunk is at epoch lo (0: none): the holders
// of the epochs in (lo, e], and the live volume for the live epoch.
func (h *holders) readers(lo, e uint32) int {
	n := 0
	i, _ := slices.BinarySearch(h.held, lo+1)
	for ; i < len(h.held) && h.held[i] <= e; i++ {
		n += int(h.refs[i])
	}
	if e == epochLive && h.live {
		n++
	}
	return n
}

// Stats is the store's space and metadata accounting. Like VolumeStat,
// every size is in bytes and every count an int64.
type Stats struct {
	ChunkSize int64
	DataBytes int64 // the data region
	UsedBytes int64 // referenced, in flight, or freed and not yet reusable
	FreeBytes int64
	// IndexEntries is the number of index entries (one per chunk version).
	IndexEntries int64
	// MetadataBytes is the metadata region in use (pages of the index
	// trees and space maps, freed ones not yet reusable included), and
	// MetadataRegion its size.
	MetadataBytes, MetadataRegion int64
	// SpaceMapMemory is the memory the space maps' bits take now: one
	// bit per data chunk and metadata page at most, and next to none
	// where the map's pages are all used or all free (docs/metadata.md
	// section 4). It counts within Options.MetadataCache, where the data
	// map has an eighth at most: past it, its bitmap pages are paged out,
	// and SpaceMapReads counts those read back since Open (section 32).
	SpaceMapMemory int64
	SpaceMapReads  int64
	Volumes        int64   // visible volumes, the origin included
	JournalFill    float64 // fraction of the journal's log in use (0 when transient)
	// BufferedBytes is the origin data that waits in memory for its
	// copy's commit (Options.OriginBuffer), in whole chunks.
	BufferedBytes int64
	// CommitWaits counts the writes since Open that waited for a tree
	// commit, or wrote one, because the changes not yet in a durable one
	// touched twice the leaves a commit is started at: what keeps Open's
	// replay after a crash bounded (docs/metadata.md section 17). A count
	// that grows steadily means the background commits fall behind the
	// writers (too little CPU or a slow metadata device).
	CommitWaits int64
}

// Stats returns the store's accounting; it walks nothing, and holds the
// store's lock only to count the volumes and entries.
func (s *Store) Stats() Stats {
	s.mu.RLock()
	vols := len(s.byName)
	entries := s.ix.len()
	s.mu.RUnlock()
	sp := s.alloc.space()
	// Chunks the metadata region grew into (GrowMetadata) are not data.
	st := Stats{ChunkSize: s.cs, DataBytes: int64(sp.Chunks-sp.ChunksMeta) * s.cs, UsedBytes: int64(sp.ChunksUsed-sp.ChunksMeta) * s.cs,
		FreeBytes: int64(sp.Chunks-sp.ChunksUsed) * s.cs, IndexEntries: int64(entries),
		MetadataBytes: int64(sp.PagesUsed) * meta.PageSize, MetadataRegion: int64(sp.Pages) * meta.PageSize,
		SpaceMapMemory: int64(sp.MapBytes), SpaceMapReads: int64(sp.MapReads), Volumes: int64(vols), BufferedBytes: s.ob.n.Load() * s.cs,
		CommitWaits: s.leafWaits.Load() + s.leafCommits.Load()}
	if s.j != nil {
		st.JournalFill = s.j.Stats().Fill
	}
	return st
}
