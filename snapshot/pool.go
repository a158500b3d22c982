package snapshot

// The store as a pool of thin volumes (docs/pool.md): blank volumes on root
// branches (CreateVolume), per-volume sizes (Resize), volume UUIDs, and
// stores without an origin device.
//
// A root branch has no parent: a chunk that no level of a chain ending at
// a root maps reads as zeros. A chain ending at branch 0 reads the origin
// device for such a chunk while it lies within the origin, and zeros past
// it (a clone of the origin grown larger than the origin).
//
// Every volume has a size in bytes: the origin's is the origin device's, a
// blank volume's is given at CreateVolume, a snapshot takes its volume's
// size when it is taken, and a clone its parent snapshot's. Resize changes
// a clone's or blank volume's (record type 12). The chunk space of every
// branch but 0 is bounded by the largest volume size, recorded at Format
// (superblock byte 120), so per-branch summaries have a fixed size.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	// maxVolumeBound is the largest volume size any store accepts.
	maxVolumeBound = 1 << 60
	// defaultMaxVolumeSize is Options.MaxVolumeSize's default (or the
	// origin's size, if larger).
	defaultMaxVolumeSize = 16 << 40
)

// UUID is a volume's stable identity: random-looking, unique across
// stores, and unchanged by renames, resizes and reopens.
type UUID [16]byte

// String formats u as 8-4-4-4-12 hex digits.
func (u UUID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:36], u[10:16])
	return string(b[:])
}

// volumeUUID derives v's UUID from what already identifies it: the store's
// random UUID, the volume's ID and its creation time (an ID can be handed
// out again after the newest volume is deleted and the store reopened; its
// creation time then differs). Nothing more needs to be stored, so every
// volume of every store format has one. It is an RFC 9562 version 8 UUID.
func (s *Store) volumeUUID(v *volume) UUID {
	var in [16 + 8 + 8]byte
	copy(in[:16], s.geo.uuid[:])
	binary.LittleEndian.PutUint64(in[16:], v.id)
	binary.LittleEndian.PutUint64(in[24:], uint64(v.created))
	h := sha256.Sum256(in[:])
	var u UUID
	copy(u[:], h[:16])
	u[6] = u[6]&0x0f | 0x80 // version 8
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	return u
}

// UUID returns the volume's stable UUID (VolumeInfo.UUID).
func (v *Volume) UUID() UUID { return v.s.volumeUUID(v.meta) }

// noOrigin stands for the origin device of a store that has none (Format
// and Open given a nil origin): a device of no bytes.
type noOrigin struct{}

var errNoOrigin = fmt.Errorf("%w: the store has no origin device", blockdev.ErrOutOfRange)

func (noOrigin) ReadAt(p []byte, _ int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return 0, errNoOrigin
}

func (noOrigin) WriteAt(p []byte, _ int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return 0, errNoOrigin
}

func (noOrigin) Flush() error { return nil }

func (noOrigin) Discard(_, n int64) error {
	if n == 0 {
		return nil
	}
	return errNoOrigin
}

func (noOrigin) Size() int64    { return 0 }
func (noOrigin) BlockSize() int { return 512 }
func (noOrigin) Close() error   { return nil }

// originOrNone is the origin device Format and Open use: origin, or
// noOrigin for nil.
func originOrNone(origin blockdev.Device) blockdev.Device {
	if origin == nil {
		return noOrigin{}
	}
	return origin
}

// poolLayout fills in a new store's origin size, no-origin flag and volume
// size bound.
func poolLayout(g *geometry, origin blockdev.Device, opts *Options) error {
	cs := int64(g.chunkSize)
	if _, none := origin.(noOrigin); none {
		g.noOrigin, g.originSize = true, 0
	} else if origin.Size() <= 0 {
		return fmt.Errorf("%w: an origin device of %d bytes (pass nil for a store without an origin)", ErrBadOptions, origin.Size())
	}
	mv := opts.MaxVolumeSize
	if mv < 0 || mv > maxVolumeBound {
		return fmt.Errorf("%w: MaxVolumeSize %d: from 0 to %d bytes", ErrBadOptions, mv, int64(maxVolumeBound))
	}
	if mv == 0 {
		mv = max(defaultMaxVolumeSize, g.originSize)
	}
	mv = (mv + cs - 1) / cs * cs
	if mv < g.originSize {
		return fmt.Errorf("%w: MaxVolumeSize %d is less than the origin's %d bytes", ErrBadOptions, opts.MaxVolumeSize, g.originSize)
	}
	g.maxVolSize = mv
	return nil
}

// checkOriginKind refuses an Open whose origin (or its absence) is not the
// store's.
func checkOriginKind(g *geometry, origin blockdev.Device) error {
	_, none := origin.(noOrigin)
	switch {
	case g.noOrigin && !none:
		return fmt.Errorf("%w: the store has no origin, and Open was given an origin device of %d bytes (pass nil)", ErrBadOptions, origin.Size())
	case !g.noOrigin && none:
		return fmt.Errorf("%w: the store's origin is a device of %d bytes, and Open was given none", ErrBadOptions, g.originSize)
	}
	return nil
}

// HasOrigin reports whether the store was formatted with an origin
// device. A store without one has no "origin" volume: Origin returns a
// handle of no bytes.
func (s *Store) HasOrigin() bool { return !s.geo.noOrigin }

// MaxVolumeSize returns the largest size a volume of the store may have,
// in bytes (Options.MaxVolumeSize as Format recorded it).
func (s *Store) MaxVolumeSize() int64 { return s.geo.volumeBound() }

// chunkBound is the number of chunks branch b's entries may address.
func (s *Store) chunkBound(b uint32) uint64 {
	if b == 0 {
		return s.chunks
	}
	return s.maxChunks
}

// volChunkLen is the number of bytes of chunk c within a volume of size
// bytes (0 past its end).
func (s *Store) volChunkLen(c uint64, size int64) int64 {
	return max(0, min(s.cs, size-int64(c)*s.cs))
}

// inheritedSize is the size a new snapshot (of br's live volume) or clone
// (of br's parent point) takes: its volume's or parent's. A store written
// before volumes had sizes gave every volume the origin's. Called with mu
// held.
func (s *Store) inheritedSize(br *branch, k Kind) int64 {
	var from *volume
	switch k {
	case KindSnapshot:
		from = s.volumes[br.liveVol]
	case KindClone:
		if !br.root && br.up != nil {
			if id, ok := s.byPoint[point{br.parent, br.parentEpoch}]; ok {
				from = s.volumes[id]
			}
		}
	}
	if from == nil {
		return s.geo.originSize
	}
	return from.size.Load()
}

// newRootBranch makes a branch with no parent. Called with mu held.
func (s *Store) newRootBranch(id uint32) *branch {
	empty := s.b0.chainGroups
	return &branch{id: id, live: true, root: true, refs: map[uint32]int32{}, groups: empty, chainGroups: empty}
}

// loadRootBranch adds a root branch read from a checkpoint image.
func (s *Store) loadRootBranch(id, last uint32, live bool) {
	br := s.newRootBranch(id)
	br.lastEpoch, br.live = last, live
	s.branches[id] = br
	if id >= s.nextBranch {
		s.nextBranch = id + 1
	}
}

// applyPoolOp applies a create or resize operation. Called with mu held.
func (s *Store) applyPoolOp(o *op, bad func(string, ...any) error) error {
	if o.size > s.geo.volumeBound() {
		return bad("%v of volume %d to %d bytes, past the store's bound %d", o.kind, o.id, o.size, s.geo.volumeBound())
	}
	if o.kind == opResize {
		v := s.volumes[o.id]
		if v == nil || v.kind != KindClone || v.hidden {
			return bad("resize of volume %d", o.id)
		}
		v.size.Store(o.size)
		return nil
	}
	if o.id == 0 || s.volumes[o.id] != nil || o.b == 0 || s.branches[o.b] != nil {
		return bad("create of volume %d on branch %d", o.id, o.b)
	}
	if _, taken := s.byName[o.name]; taken {
		return bad("create of volume %d: name %q taken", o.id, o.name)
	}
	br := s.newRootBranch(o.b)
	s.branches[o.b] = br
	if o.b >= s.nextBranch {
		s.nextBranch = o.b + 1
	}
	v := &volume{id: o.id, name: o.name, kind: KindClone, branch: o.b, epoch: epochLive, created: o.time}
	v.size.Store(o.size)
	br.liveVol = v.id
	s.volumes[v.id] = v
	s.byName[v.name] = v.id
	if v.id >= s.nextVol {
		s.nextVol = v.id + 1
	}
	return nil
}

// kindOf is the kind VolumeInfo and Volume.Kind report: a clone on a root
// branch is a KindVolume. Called with mu held (or on a branch whose root
// flag, fixed at its creation, is all it reads).
func kindOf(v *volume, br *branch) Kind {
	if v.kind == KindClone && br != nil && br.root {
		return KindVolume
	}
	return v.kind
}

// checkVolumeSize refuses a size that is not positive, not a multiple of
// the store's block size, or past the store's bound.
func (s *Store) checkVolumeSize(size int64) error {
	if size <= 0 || size%int64(s.bs) != 0 || size > s.geo.volumeBound() {
		return fmt.Errorf("%w: volume size %d: a positive multiple of %d bytes, at most %d (Options.MaxVolumeSize at Format)",
			ErrBadOptions, size, s.bs, s.geo.volumeBound())
	}
	return nil
}

// CreateVolume makes a blank thin volume of size bytes, named name: it
// reads as zeros and takes store space only where it is written. Its
// snapshots and their clones work as a clone's do. size must be a positive
// multiple of the volume block size (BlockSize of any volume) and at most
// MaxVolumeSize. O(1): one journal record, durable when it returns.
func (s *Store) CreateVolume(name string, size int64) (*Volume, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	return s.createVolume(name, size)
}

// createVolume is CreateVolume without the name rules (Import's hidden
// name has a slash).
func (s *Store) createVolume(name string, size int64) (*Volume, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	if err := s.checkVolumeSize(size); err != nil {
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
	sc.ops = append(sc.ops, op{kind: opCreate, id: id, b: s.nextBranch, size: size, time: time.Now().UnixNano(), name: name})
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

// Size implements blockdev.Device: the volume's size in bytes. A clone's
// or blank volume's changes with Resize, and open handles see the new
// size at once.
func (v *Volume) Size() int64 { return v.meta.size.Load() }

// checkSize reports a volume whose size breaks the rules: the origin's is
// the origin device's; every other is positive and within the store's
// bound. It reads only the record (Check's copy of the state), so no
// lock is needed.
func checkSize(v volRec, originSize, bound int64, bad func(string, ...any) bool) {
	switch {
	case v.kind == KindOrigin && v.size != originSize:
		bad("origin volume of %d bytes, origin device %d", v.size, originSize)
	case v.kind != KindOrigin && (v.size <= 0 || v.size > bound):
		bad("volume %d of %d bytes (bound %d)", v.id, v.size, bound)
	}
}
