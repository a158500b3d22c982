package snapshot

// The identity region: who holds the store open, and which origin it
// belongs to. Two copies (slots) of one 4096-byte block, at store bytes
// 4096 and 8192, right after the superblock:
//
//	offset size  field
//	     0    8  magic "BSNAPIDN"
//	     8    4  CRC32C of the block with this field zero, salted with saltIdentity
//	    12    4  slot number (0 or 1): a misdirected block is detected
//	    16    8  sequence number: of two valid slots the greater wins
//	    24   16  store UUID (the superblock's)
//	    40    8  origin size in bytes when fingerprinted (the superblock's)
//	    48    4  sample count n (0: no fingerprint; at most 16)
//	    52    4  sample length in bytes (4096, or the origin size if smaller)
//	    56    4  dirty mask: bit i set = sample i may have changed since
//	             its hash was taken (Open ignores it)
//	    60    4  zero
//	    64  128  16 sample hashes (CRC-64/ECMA of the sample's bytes); those
//	             past n are zero
//	   192   16  owner's open id (random per Open; all zero: nobody holds it)
//	   208    8  owner's pid
//	   216    8  owner's open time (unix ns)
//	   224    4  owner flags: bit 0 = the owner holds the store device's
//	             flock (blockdev.Locker); other bits must be 0
//	   228    4  owner's host name length (at most 64)
//	   232   64  owner's host name, zero padded
//	   296 3800  zero
//
// All integers little-endian. Every change writes slot 0, flushes, writes
// slot 1 and flushes, both with the same contents and a new sequence
// number: a crash tears at most the slot being written, and the other is
// then a state that was durable and true (the origin is written only
// after the change that marks its sample dirty is durable). A bit flip in
// one slot is harmless, as its twin holds the same state. The superblock
// itself is never rewritten for these changes: a torn superblock would
// lose the store.
//
// The fingerprint samples n 4096-byte blocks of the origin spread evenly
// over it, the first and the last included (samplePositions). The write
// path pays only for a write that touches a sample whose dirty bit is not
// yet durable: it marks the bit and writes the slots before its data goes
// to the origin device (markSamples). After an origin Flush, each dirty
// sample that no write touched since the Flush began is hashed again and
// marked clean (settleSamples), so the recorded fingerprint follows the
// origin. Open compares the clean samples with the origin device and
// refuses a different one with an *OriginError.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	identityMagic = "BSNAPIDN"
	identitySlot  = 4096
	identityLen   = 2 * identitySlot
	maxSamples    = 16
	sampleBytes   = 4096
	maxHostLen    = 64
	saltIdentity  = 0x5b5ca504
	ownerFlock    = 1
)

var crcTable = crc64.MakeTable(crc64.ECMA)

// ErrWrongOrigin is what Format's store, opened with another origin
// device than its own, fails with (errors.As gives an *OriginError).
var ErrWrongOrigin = errors.New("snapshot: this store belongs to a different origin")

// OriginError says why an origin device is not the store's: its size, or
// the contents of the sampled blocks that no crash may have left changed.
type OriginError struct {
	Size        int64  // the store's origin size
	Fingerprint uint64 // the store's recorded fingerprint (0: none recorded)
	GotSize     int64  // the device's size
	// GotFingerprint is the device's fingerprint at the same samples
	// (0 when the sizes differ).
	GotFingerprint uint64
	Samples        []int64 // offsets of the samples that differ
}

func (e *OriginError) Error() string {
	if e.Size != e.GotSize {
		return fmt.Sprintf("snapshot: this store belongs to a different origin (size %d, fingerprint %016x): the origin device has %d bytes",
			e.Size, e.Fingerprint, e.GotSize)
	}
	return fmt.Sprintf("snapshot: this store belongs to a different origin (size %d, fingerprint %016x): the origin device's fingerprint is %016x (blocks at %v differ)",
		e.Size, e.Fingerprint, e.GotFingerprint, e.Samples)
}

func (e *OriginError) Is(target error) bool { return target == ErrWrongOrigin }

// ownerRecord is who holds a store open.
type ownerRecord struct {
	id    [16]byte // zero: nobody
	pid   uint64
	since int64
	flock bool
	host  string
}

func (o ownerRecord) held() bool { return o.id != [16]byte{} }

// identState is one slot's contents.
type identState struct {
	seq        uint64
	uuid       [16]byte
	originSize int64
	n          int
	sampleLen  int64
	dirty      uint32
	hash       [maxSamples]uint64
	owner      ownerRecord
}

// fingerprint folds the sample hashes into one number for messages.
func (st *identState) fingerprint() uint64 {
	if st.n == 0 {
		return 0
	}
	var b [maxSamples * 8]byte
	for i := 0; i < st.n; i++ {
		binary.LittleEndian.PutUint64(b[i*8:], st.hash[i])
	}
	return crc64.Checksum(b[:st.n*8], crcTable)
}

func (st *identState) encode(slot int) []byte {
	return st.encodeTo(make([]byte, identitySlot), slot)
}

// encodeTo encodes slot's image into b (identitySlot bytes) and returns
// it.
func (st *identState) encodeTo(b []byte, slot int) []byte {
	clear(b)
	le := binary.LittleEndian
	copy(b, identityMagic)
	le.PutUint32(b[12:], uint32(slot))
	le.PutUint64(b[16:], st.seq)
	copy(b[24:40], st.uuid[:])
	le.PutUint64(b[40:], uint64(st.originSize))
	le.PutUint32(b[48:], uint32(st.n))
	le.PutUint32(b[52:], uint32(st.sampleLen))
	le.PutUint32(b[56:], st.dirty)
	for i := 0; i < st.n; i++ {
		le.PutUint64(b[64+8*i:], st.hash[i])
	}
	o := &st.owner
	if o.held() {
		copy(b[192:208], o.id[:])
		le.PutUint64(b[208:], o.pid)
		le.PutUint64(b[216:], uint64(o.since))
		if o.flock {
			le.PutUint32(b[224:], ownerFlock)
		}
		le.PutUint32(b[228:], uint32(len(o.host)))
		copy(b[232:232+maxHostLen], o.host)
	}
	le.PutUint32(b[8:], checksum(saltIdentity, b))
	return b
}

// decodeIdentity parses and validates identity slot slot of the store g
// describes. It never panics; every failure wraps ErrCorrupt with the
// store offset and byte that were wrong.
func decodeIdentity(b []byte, slot int, g *geometry) (identState, error) {
	var st identState
	at := g.idOff + int64(slot)*identitySlot
	bad := func(off int, format string, args ...any) error {
		return fmt.Errorf("%w: identity slot %d at store offset %d, byte %d: %s", ErrCorrupt, slot, at, off, fmt.Sprintf(format, args...))
	}
	if len(b) < identitySlot {
		return st, bad(0, "short block of %d bytes", len(b))
	}
	b = b[:identitySlot]
	if string(b[:8]) != identityMagic {
		return st, bad(0, "bad magic %q", b[:8])
	}
	le := binary.LittleEndian
	var tmp [identitySlot]byte
	copy(tmp[:], b)
	le.PutUint32(tmp[8:], 0)
	if want, got := checksum(saltIdentity, tmp[:]), le.Uint32(b[8:]); want != got {
		return st, bad(8, "checksum %#x, want %#x", got, want)
	}
	if s := le.Uint32(b[12:]); s != uint32(slot) {
		return st, bad(12, "block of slot %d", s)
	}
	st.seq = le.Uint64(b[16:])
	copy(st.uuid[:], b[24:40])
	if st.uuid != g.uuid {
		return st, bad(24, "written by another store (UUID %x)", st.uuid)
	}
	st.originSize = int64(le.Uint64(b[40:]))
	if st.originSize != g.originSize {
		return st, bad(40, "origin size %d, the superblock records %d", st.originSize, g.originSize)
	}
	n, sl := le.Uint32(b[48:]), le.Uint32(b[52:])
	if n > maxSamples || n != 0 && (int(n) != sampleCount(g.originSize) || int64(sl) != sampleLen(g.originSize)) || n == 0 && sl != 0 {
		return st, bad(48, "%d samples of %d bytes for an origin of %d bytes", n, sl, g.originSize)
	}
	st.n, st.sampleLen = int(n), int64(sl)
	st.dirty = le.Uint32(b[56:])
	if st.dirty>>st.n != 0 || le.Uint32(b[60:]) != 0 {
		return st, bad(56, "dirty mask %#x for %d samples", st.dirty, st.n)
	}
	for i := range maxSamples {
		st.hash[i] = le.Uint64(b[64+8*i:])
		if i >= st.n && st.hash[i] != 0 {
			return st, bad(64+8*i, "hash of sample %d of %d", i, st.n)
		}
	}
	o := &st.owner
	copy(o.id[:], b[192:208])
	o.pid = le.Uint64(b[208:])
	o.since = int64(le.Uint64(b[216:]))
	flags, hl := le.Uint32(b[224:]), le.Uint32(b[228:])
	switch {
	case flags&^ownerFlock != 0:
		return st, bad(224, "unknown owner flags %#x", flags)
	case hl > maxHostLen:
		return st, bad(228, "host name of %d bytes", hl)
	case !o.held() && (o.pid != 0 || o.since != 0 || flags != 0 || hl != 0):
		return st, bad(208, "owner fields without an open id")
	}
	o.flock = flags&ownerFlock != 0
	o.host = string(b[232 : 232+hl])
	if !isZero(b[232+hl : 232+maxHostLen]) {
		return st, bad(232+int(hl), "bytes after the host name")
	}
	if !isZero(b[232+maxHostLen:]) {
		return st, bad(232+maxHostLen, "nonzero tail")
	}
	return st, nil
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// sampleLen is the bytes of each origin sample: one 4096-byte block, or
// the whole of a smaller origin.
func sampleLen(originSize int64) int64 { return min(sampleBytes, originSize) }

// sampleCount is how many samples an origin of originSize bytes has:
// none for a store without an origin (size 0).
func sampleCount(originSize int64) int {
	if originSize <= 0 {
		return 0
	}
	return int(min(maxSamples, max(1, originSize/sampleBytes)))
}

// samplePositions returns the samples' offsets, ascending: spread evenly
// from the first block to the last, on 4096-byte boundaries (so aligned
// for any device block size), or 0 alone for an origin under 4096 bytes.
func samplePositions(originSize int64) (pos [maxSamples]int64, n int) {
	n = sampleCount(originSize)
	l := sampleLen(originSize)
	if n <= 1 {
		return pos, n
	}
	span := originSize - l
	for i := 0; i < n; i++ {
		pos[i] = span * int64(i) / int64(n-1) / sampleBytes * sampleBytes
	}
	return pos, n
}

// ident is a store's identity state in memory.
type ident struct {
	// pos, n and l are the samples' offsets, count and length, fixed by
	// Format or Open; n is 0 where there is nothing to keep current (a
	// transient store, one without an origin or formatted before the
	// identity region existed).
	pos [maxSamples]int64
	n   int
	l   int64
	// durable has bit i set while sample i's dirty bit is durable: the
	// write path's one check (an atomic load) for a write that touches a
	// sample.
	durable atomic.Uint32
	// gen[i] counts the device writes that touched sample i; it changes
	// only under the sample's origin stripe (shared), and settleSamples
	// reads it under the stripe held exclusively.
	gen [maxSamples]atomic.Uint64

	// mu guards st and the region's writes. Lock order: after the origin
	// stripes (the write path marks samples with its stripes held); no
	// lock of the store is taken under it.
	mu  sync.Mutex
	st  identState
	buf []byte // a slot image being written, aligned for any block size
}

// writeIdentityLocked writes st to both slots, each followed by a flush.
// Called with id.mu held.
func (s *Store) writeIdentityLocked() error {
	id := &s.id
	id.st.seq++
	if id.buf == nil {
		id.buf = blockdev.AlignedBuffer(identitySlot)
	}
	for slot := range 2 {
		b := id.st.encodeTo(id.buf, slot)
		if _, err := s.store.WriteAt(b, s.geo.idOff+int64(slot)*identitySlot); err != nil {
			return fmt.Errorf("snapshot: write identity slot %d: %w", slot, err)
		}
		if err := s.store.Flush(); err != nil {
			return fmt.Errorf("snapshot: flush identity slot %d: %w", slot, err)
		}
	}
	return nil
}

// readIdentity reads both slots and returns the newer valid one. Both
// invalid is ErrCorrupt: the write order never leaves two torn slots.
func readIdentity(store interface {
	ReadAt([]byte, int64) (int, error)
}, g *geometry) (identState, error) {
	var best identState
	var errs []error
	found := false
	buf := blockdev.AlignedBuffer(identityLen) // O_DIRECT devices need it
	if _, err := store.ReadAt(buf, g.idOff); err != nil {
		return best, fmt.Errorf("snapshot: read identity region: %w", err)
	}
	for slot := range 2 {
		st, err := decodeIdentity(buf[slot*identitySlot:], slot, g)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !found || st.seq > best.seq {
			best, found = st, true
		}
	}
	if !found {
		return best, errors.Join(errs...)
	}
	return best, nil
}

// hashSamples hashes the origin device's samples at pos (each l bytes).
func hashSamples(origin interface {
	ReadAt([]byte, int64) (int, error)
}, pos *[maxSamples]int64, n int, l int64) ([maxSamples]uint64, error) {
	var h [maxSamples]uint64
	buf := blockdev.AlignedBuffer(int(l))
	for i := 0; i < n; i++ {
		if _, err := origin.ReadAt(buf, pos[i]); err != nil {
			return h, fmt.Errorf("snapshot: read origin sample at %d: %w", pos[i], err)
		}
		h[i] = crc64.Checksum(buf, crcTable)
	}
	return h, nil
}

// newIdentity is a fresh store's identity state: its origin fingerprinted
// (all samples clean; Format flushed the origin first).
func (s *Store) newIdentity() error {
	id := &s.id
	id.pos, id.n = samplePositions(s.geo.originSize)
	id.l = sampleLen(s.geo.originSize)
	h, err := hashSamples(s.origin, &id.pos, id.n, id.l)
	if err != nil {
		return err
	}
	id.st = identState{uuid: s.geo.uuid, originSize: s.geo.originSize, n: id.n, sampleLen: id.l, hash: h}
	return nil
}

// checkOrigin compares st's clean samples with the origin device.
func checkOrigin(origin interface {
	ReadAt([]byte, int64) (int, error)
	Size() int64
}, st *identState) error {
	if st.n == 0 {
		return nil
	}
	pos, n := samplePositions(st.originSize)
	got, err := hashSamples(origin, &pos, n, st.sampleLen)
	if err != nil {
		return err
	}
	var diff []int64
	for i := 0; i < n; i++ {
		if st.dirty&(1<<i) == 0 && got[i] != st.hash[i] {
			diff = append(diff, pos[i])
		}
	}
	if len(diff) == 0 {
		return nil
	}
	other := *st
	other.hash = got
	return &OriginError{Size: st.originSize, Fingerprint: st.fingerprint(), GotSize: origin.Size(),
		GotFingerprint: other.fingerprint(), Samples: diff}
}

// touched returns the samples [lo, hi) that bytes [off, off+n) overlap:
// from the first that ends after off (positions ascend, so a binary
// search finds it) to the last that starts before off+n.
func (id *ident) touched(off, n int64) (lo, hi int) {
	lo, hi = 0, id.n
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if id.pos[m]+id.l <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	hi = lo
	for hi < id.n && id.pos[hi] < off+n {
		hi++
	}
	return lo, hi
}

// touchSamples is called before a device write or discard of origin bytes
// [off, off+n), with the origin stripes of those bytes held: it counts the
// write against each sample it touches and makes those samples' dirty
// bits durable first. A write that touches no sample costs a few
// comparisons.
func (s *Store) touchSamples(off, n int64) error {
	id := &s.id
	var mask uint32
	lo, hi := id.touched(off, n)
	for i := lo; i < hi; i++ {
		id.gen[i].Add(1)
		mask |= 1 << i
	}
	if mask == 0 || id.durable.Load()&mask == mask {
		return nil
	}
	return s.markSamples(mask)
}

// markQueued makes durable, in one write of the identity slots, the dirty
// bits of every sample that the buffered entries q touch, before a drain
// writes them out. Without it each sample's first write-out after an
// origin Flush paid its own two slot writes and two device flushes, on the
// drain that every writer waiting for buffer room waits for: 15 marks per
// pass of a 64 MiB random first write, a fifth more flushes than its
// journal commits. Marking more samples than a drain then writes (entries
// it keeps) only makes them dirty early, which is always safe; the drain's
// touchSamples still checks each write-out, so a sample settled meanwhile
// is marked again there.
func (s *Store) markQueued(q []*obEntry) error {
	mask := s.unmarkedOf(q)
	if mask == 0 {
		return nil
	}
	return s.markSamples(mask)
}

// unmarkedOf returns the samples the buffered entries q touch whose dirty
// bit is not durable yet (0: markQueued has nothing to write).
func (s *Store) unmarkedOf(q []*obEntry) uint32 {
	id := &s.id
	if id.n == 0 {
		return 0
	}
	all := uint32(1)<<id.n - 1
	durable := id.durable.Load()
	mask := uint32(0)
	for _, e := range q {
		lo, hi := id.touched(int64(e.c)*s.cs, s.chunkLen(e.c))
		for i := lo; i < hi; i++ {
			mask |= 1 << i
		}
		if (mask|durable)&all == all {
			break
		}
	}
	return mask &^ durable
}

// markSamples makes the dirty bits of mask durable.
func (s *Store) markSamples(mask uint32) error {
	id := &s.id
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.durable.Load()&mask == mask {
		return nil // another writer marked them
	}
	id.st.dirty |= mask
	if err := s.writeIdentityLocked(); err != nil {
		return err
	}
	id.durable.Store(id.st.dirty)
	return nil
}

// settleSamples records the current hash of each dirty sample that no
// write touched since gens was taken (before the origin Flush that has
// just returned) and that the origin buffer does not hold, and marks it
// clean. Called with no lock of the store held.
func (s *Store) settleSamples(gens *[maxSamples]uint64) error {
	id := &s.id
	dirty := id.durable.Load()
	if dirty == 0 {
		return nil
	}
	buf := blockdev.AlignedBuffer(int(id.l))
	changed := false
	for i := 0; i < id.n; i++ {
		if dirty&(1<<i) == 0 {
			continue
		}
		c := uint64(id.pos[i] / s.cs)
		s.lockOrigin(c, c, true)
		if id.gen[i].Load() != gens[i] || s.bufferedLocked(c) != nil {
			s.unlockOrigin(c, c, true)
			continue
		}
		if _, err := s.origin.ReadAt(buf, id.pos[i]); err != nil {
			s.unlockOrigin(c, c, true)
			return fmt.Errorf("snapshot: read origin sample at %d: %w", id.pos[i], err)
		}
		h := crc64.Checksum(buf, crcTable)
		id.mu.Lock()
		id.st.hash[i] = h
		id.st.dirty &^= 1 << i
		id.durable.Store(id.st.dirty)
		id.mu.Unlock()
		s.unlockOrigin(c, c, true)
		changed = true
	}
	if !changed {
		return nil
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	return s.writeIdentityLocked()
}

// sampleGens takes each dirty sample's write count, with its stripe held
// exclusively so that no write to it is in flight: every write counted
// has completed before the Flush about to start (called right after), and
// one it may not cover changes the count.
func (s *Store) sampleGens() (gens [maxSamples]uint64) {
	id := &s.id
	dirty := id.durable.Load()
	for i := 0; i < id.n; i++ {
		if dirty&(1<<i) == 0 {
			continue
		}
		c := uint64(id.pos[i] / s.cs)
		s.lockOrigin(c, c, true)
		gens[i] = id.gen[i].Load()
		s.unlockOrigin(c, c, true)
	}
	return gens
}

// checkSamples reports each clean sample whose origin block no longer
// hashes as recorded: the origin was written outside the store, and its
// snapshots may no longer hold what they did. Each is read with its
// stripe held exclusively, so no write of the store is in flight on it
// (the store marks a sample dirty before it writes it).
func (s *Store) checkSamples(bad func(format string, args ...any) bool) {
	id := &s.id
	if id.n == 0 {
		return
	}
	buf := blockdev.AlignedBuffer(int(id.l))
	for i := 0; i < id.n; i++ {
		c := uint64(id.pos[i] / s.cs)
		s.lockOrigin(c, c, true)
		id.mu.Lock()
		clean, want := id.st.dirty&(1<<i) == 0, id.st.hash[i]
		id.mu.Unlock()
		// A read that fails says nothing about the store's consistency
		// (the device's error reaches the volume's readers): skipped.
		if clean && s.readSample(buf, id.pos[i]) {
			if got := crc64.Checksum(buf, crcTable); got != want && !s.sampleMovedOn(i, got) {
				bad("origin block at %d changed outside the store (hash %016x, recorded %016x): snapshots of the origin may no longer match it",
					id.pos[i], got, want)
			}
		}
		s.unlockOrigin(c, c, true)
	}
}

// sampleMovedOn reports, for a read-only store, whether sample i, read
// after the Open with hash got, was changed by a live writer: the
// identity region, read again now, marks it dirty or records got. A
// writer makes the dirty bit durable before it writes the origin, and
// clears it only with the new hash, so a sample it wrote since the Open
// always shows one of the two here (livero.go). Read-write stores, and
// regions that cannot be read, say no.
func (s *Store) sampleMovedOn(i int, got uint64) bool {
	if !s.opts.ReadOnly {
		return false
	}
	st, err := readIdentity(s.store, &s.geo)
	return err == nil && i < st.n && (st.dirty&(1<<i) != 0 || st.hash[i] == got)
}

// readSample reads the sample at pos into buf and reports whether it
// could.
func (s *Store) readSample(buf []byte, pos int64) bool {
	_, err := s.origin.ReadAt(buf, pos)
	return err == nil
}
