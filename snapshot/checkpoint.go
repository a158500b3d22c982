package snapshot

// The checkpoint image: the whole state, streamed into a journal slot.
//
//	offset size  field
//	     0    8  magic "BSNAPCKP"
//	     8    4  version (1), little-endian
//	    12    -  uv next volume id, uv next branch id
//	          -  uv branch count; per branch: uv id, uv parent, uv parent epoch,
//	             uv last epoch, uv live (0/1)
//	          -  uv volume count; per volume (the origin excluded): uv id,
//	             uv kind, uv branch, uv epoch, uv hidden, sv created, uv parent,
//	             uv name length, name
//	          -  entry runs in (branch, epoch, chunk) order, each: a tag byte
//	             (1: new branch/epoch follows, 2: same as the previous run),
//	             [uv branch, uv epoch], uv chunk (tag 2: delta from the previous
//	             run's end), uv count, uv location (0 zero, 1 inherit, else 2 +
//	             zigzag of the delta from the previous data run's end); tag 0
//	             ends the runs
//	     -    4  CRC32C, salted with saltCheckpoint, of every byte before it
//
// A run is count consecutive chunks at one (branch, epoch) with consecutive
// store locations (or the same special location), so sequential writes cost
// a few bytes per extent, random ones a few bytes per chunk.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"slices"
)

const (
	checkpointMagic   = "BSNAPCKP"
	checkpointVersion = 1
)

// capture is a consistent copy of the state, taken under mu, that the
// checkpointer streams without holding any lock.
type capture struct {
	upTo     uint64
	growth   int64 // Store.metaGrowth when captured
	ix       index
	nextVol  uint64
	nextBr   uint32
	branches []branchRec
	volumes  []volRec
}

// volRec is a volume's persistent fields.
type volRec struct {
	id, parent, created int64
	name                string
	kind                Kind
	branch, epoch       uint32
	hidden              bool
}

type branchRec struct {
	id, parent, parentEpoch, lastEpoch uint32
	live                               bool
}

func (s *Store) captureLocked() capture {
	c := capture{ix: s.ix.clone(), nextVol: s.nextVol, nextBr: s.nextBranch, growth: s.metaGrowth.Load()}
	if s.j != nil {
		c.upTo = s.j.LastSeq()
	}
	for _, br := range s.branches {
		c.branches = append(c.branches, branchRec{br.id, br.parent, br.parentEpoch, br.lastEpoch, br.live})
	}
	slices.SortFunc(c.branches, func(a, b branchRec) int { return int(int64(a.id) - int64(b.id)) })
	for _, v := range s.volumes {
		if v.kind != KindOrigin {
			c.volumes = append(c.volumes, volRec{id: int64(v.id), name: v.name, kind: v.kind, branch: v.branch,
				epoch: v.epoch, hidden: v.hidden, created: v.created, parent: int64(v.parent)})
		}
	}
	slices.SortFunc(c.volumes, func(a, b volRec) int { return int(a.id - b.id) })
	return c
}

// maybeCaptureLocked hands a capture to the checkpointer when the journal
// asks for a checkpoint. Capturing here, under mu, means the checkpointer
// never needs mu.
func (s *Store) maybeCaptureLocked() {
	select {
	case _, ok := <-s.j.NeedCheckpoint():
		if ok && !s.ckptBusy.Load() {
			s.postCaptureLocked()
		}
	default:
	}
}

// postCaptureLocked hands the checkpointer a capture of the state now; it
// replaces one the checkpointer has not taken yet. Every sender holds mu,
// so the channel (one slot) is empty when the send comes.
func (s *Store) postCaptureLocked() {
	c := s.captureLocked()
	select {
	case <-s.ckptCh:
	default:
	}
	s.postedUpTo = c.upTo
	s.ckptBusy.Store(true)
	s.ckptCh <- c
}

// checkpointer writes the captures it is handed, then lets the chunks
// freed by the records they cover be reused.
func (s *Store) checkpointer() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case c := <-s.ckptCh:
			err := s.writeCheckpoint(s.ctx, c)
			s.ckptBusy.Store(false)
			if err != nil && s.ctx.Err() == nil {
				_ = s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
				return
			}
			if err == nil {
				s.releaseFreed(c.upTo)
			}
		}
	}
}

// Checkpoint writes a checkpoint now and waits for it (tests and tools;
// the store checkpoints by itself in the background).
func (s *Store) Checkpoint(ctx context.Context) error {
	if err := s.writable(); err != nil {
		return err
	}
	if s.j == nil {
		return nil
	}
	s.mu.Lock()
	c := s.captureLocked()
	s.mu.Unlock()
	if err := s.writeCheckpoint(ctx, c); err != nil {
		return err
	}
	s.releaseFreed(c.upTo)
	return nil
}

// writeCheckpoint writes c unless a newer checkpoint has been written; the
// image's size becomes the measured base of the metadata bound.
func (s *Store) writeCheckpoint(ctx context.Context, c capture) error {
	s.ckptMu.Lock()
	defer s.ckptMu.Unlock()
	if c.upTo < s.ckptUpTo {
		return nil
	}
	var n int64
	err := s.j.Checkpoint(ctx, c.upTo, func(w io.Writer) error {
		var err error
		n, err = c.encode(w)
		return err
	})
	if err != nil {
		return err
	}
	s.ckptUpTo = c.upTo
	s.setDurable(c.upTo)
	s.setMark(&metaMark{bytes: n, growth: c.growth})
	return nil
}

// setMark makes m the measured base of the metadata bound unless a later
// capture has been measured already.
func (s *Store) setMark(m *metaMark) {
	for {
		cur := s.metaMark.Load()
		if m.growth < cur.growth || s.metaMark.CompareAndSwap(cur, m) {
			return
		}
	}
}

// measureMeta measures the metadata image now (a walk of a lazy copy of
// the index, outside mu, no I/O) and makes it the bound's base.
func (s *Store) measureMeta() {
	s.mu.Lock()
	c := s.captureLocked()
	s.mu.Unlock()
	s.setMark(&metaMark{bytes: c.metadataBytes(), growth: c.growth})
}

// metaMark is a measured point of the metadata bound: the checkpoint image
// of a capture was bytes long, and metaGrowth was growth at the capture.
type metaMark struct {
	bytes, growth int64
}

// emptyImage bounds the image of a store with no volumes or entries, the
// base of the bound before the first checkpoint.
const emptyImage = 64

// metaBound returns the bound on the checkpoint image now, and the part
// of it not measured by a checkpoint.
func (s *Store) metaBound() (bound, unmeasured int64) {
	m := s.metaMark.Load()
	unmeasured = s.metaGrowth.Load() - m.growth
	return m.bytes + unmeasured, unmeasured
}

// metaLimit is the most the bound may reach: the checkpoint slot, less a
// sixteenth kept for the collector (whose records are not refused).
func (s *Store) metaLimit() int64 {
	slot := s.geo.journalLen / 4 / 4096 * 4096 // journalOptions' CheckpointSize
	return slot - slot/16
}

// metaRoomLocked refuses, with ErrNoSpace, operations whose worst-case
// growth of the image would take the bound past metaLimit: a store must
// never hold more than it can checkpoint. Called with mu held.
func (s *Store) metaRoomLocked(cost int64) error {
	if cost == 0 {
		return nil
	}
	if bound, _ := s.metaBound(); bound+cost > s.metaLimit() {
		return fmt.Errorf("%w: the metadata would outgrow its %d-byte checkpoint slot (up to %d bytes now)",
			ErrNoSpace, s.geo.journalLen/4/4096*4096, bound)
	}
	return nil
}

// opsCost is the most that applying ops can add to the checkpoint image.
// A put adds at most one run (entries at consecutive chunks and
// locations); a del can split a run in two; a move is a del and a put.
// Either can also lengthen the next run's deltas (chunk and location).
func (s *Store) opsCost(ops []op) int64 {
	cw := int64(uvLen(s.chunks))
	lw := int64(uvLen(2*s.geo.dataChunks + 4))
	run := 1 + 5 + 5 + 2*cw + cw + 2*lw // tag, branch, epoch, chunk, count, location; the next run's deltas
	var n int64
	for i := range ops {
		switch o := &ops[i]; o.kind {
		case opPut, opDel:
			n += run
		case opMove:
			n += 2 * run
		case opBranch:
			n += 5 * 5
		case opVolume:
			n += 7*10 + int64(len(o.name)) // and the next volume or branch id
		case opRename:
			n += int64(len(o.name))
		}
	}
	return n
}

func uvLen(v uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], v)
}

// encoder writes varints through a buffer and a running checksum.
type encoder struct {
	w   *bufio.Writer
	crc hash.Hash32
	tmp [binary.MaxVarintLen64]byte
	n   int64
	err error
}

func (e *encoder) bytes(p []byte) {
	if e.err != nil {
		return
	}
	e.crc.Write(p)
	_, e.err = e.w.Write(p)
	e.n += int64(len(p))
}

func (e *encoder) byte1(b byte) {
	e.tmp[0] = b
	e.bytes(e.tmp[:1])
}

func (e *encoder) uv(v uint64) { e.bytes(e.tmp[:binary.PutUvarint(e.tmp[:], v)]) }
func (e *encoder) sv(v int64)  { e.bytes(e.tmp[:binary.PutVarint(e.tmp[:], v)]) }

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// encode writes the image to w and returns its length.
func (c *capture) encode(w io.Writer) (int64, error) {
	e := &encoder{w: bufio.NewWriterSize(w, 64<<10), crc: crc32.New(castagnoli)}
	var salt [4]byte
	binary.LittleEndian.PutUint32(salt[:], saltCheckpoint)
	e.crc.Write(salt[:])
	c.encodeTo(e)
	sum := e.crc.Sum32()
	binary.LittleEndian.PutUint32(e.tmp[:4], sum)
	if e.err == nil {
		_, e.err = e.w.Write(e.tmp[:4])
	}
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.n + 4, e.err
}

func (c *capture) encodeTo(e *encoder) {
	var hdr [12]byte
	copy(hdr[:], checkpointMagic)
	binary.LittleEndian.PutUint32(hdr[8:], checkpointVersion)
	e.bytes(hdr[:])
	e.uv(c.nextVol)
	e.uv(uint64(c.nextBr))
	e.uv(uint64(len(c.branches)))
	for _, b := range c.branches {
		e.uv(uint64(b.id))
		e.uv(uint64(b.parent))
		e.uv(uint64(b.parentEpoch))
		e.uv(uint64(b.lastEpoch))
		e.uv(b2u(b.live))
	}
	e.uv(uint64(len(c.volumes)))
	for i := range c.volumes {
		v := &c.volumes[i]
		e.uv(uint64(v.id))
		e.uv(uint64(v.kind))
		e.uv(uint64(v.branch))
		e.uv(uint64(v.epoch))
		e.uv(b2u(v.hidden))
		e.sv(v.created)
		e.uv(uint64(v.parent))
		e.uv(uint64(len(v.name)))
		e.bytes([]byte(v.name))
	}
	encodeRuns(c.ix, e)
	e.byte1(0)
}

// run is a maximal extent of entries.
type run struct {
	b, e   uint32
	c, n   uint64
	loc    uint64
	active bool
}

// encodeRuns writes the index as runs; it returns nothing, errors stick in e.
func encodeRuns(ix index, e *encoder) {
	var cur run
	var prevEnd, locEnd uint64
	var pb, pe uint32
	first := true
	flush := func() {
		if !cur.active {
			return
		}
		if first || cur.b != pb || cur.e != pe {
			e.byte1(1)
			e.uv(uint64(cur.b))
			e.uv(uint64(cur.e))
			e.uv(cur.c)
		} else {
			e.byte1(2)
			e.uv(cur.c - prevEnd)
		}
		first, pb, pe, prevEnd = false, cur.b, cur.e, cur.c+cur.n
		e.uv(cur.n)
		switch cur.loc {
		case locZero:
			e.uv(0)
		case locInherit:
			e.uv(1)
		default:
			d := int64(cur.loc - locEnd)
			e.uv(2 + uint64((d<<1)^(d>>63)))
			locEnd = cur.loc + cur.n
		}
	}
	ix.byEpoch.Ascend(func(x entry) bool {
		if cur.active && x.b == cur.b && x.e == cur.e && x.c == cur.c+cur.n &&
			((x.isData() && cur.loc < locInherit && x.loc == cur.loc+cur.n) || (!x.isData() && x.loc == cur.loc)) {
			cur.n++
			return true
		}
		flush()
		cur = run{b: x.b, e: x.e, c: x.c, n: 1, loc: x.loc, active: true}
		return e.err == nil
	})
	flush()
}

// metadataBytes is the size of the checkpoint image of c.
func (c *capture) metadataBytes() int64 {
	e := &encoder{w: bufio.NewWriterSize(io.Discard, 4096), crc: crc32.New(castagnoli)}
	c.encodeTo(e)
	return e.n + 4
}

// replayer adapts Store to journal.Replayer.
type replayer Store

func (r *replayer) LoadCheckpoint(rd io.Reader) error { return (*Store)(r).loadCheckpoint(rd) }

func (r *replayer) Replay(seq uint64, payload []byte) error {
	s := (*Store)(r)
	ops, err := decodeRecord(nil, payload, fmt.Sprintf("journal record %d", seq))
	if err != nil {
		return err
	}
	return s.applyOps(ops, seq, true)
}

var errCkptShort = errors.New("truncated")

// ckptReader reads the image, checksumming what it consumes.
type ckptReader struct {
	r   *bufio.Reader
	crc hash.Hash32
	off int64
	err error
}

func (d *ckptReader) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: checkpoint image, byte %d: %s", ErrCorrupt, d.off, fmt.Sprintf(format, args...))
	}
}

func (d *ckptReader) byte1() byte {
	if d.err != nil {
		return 0
	}
	b, err := d.r.ReadByte()
	if err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			d.fail("%v", errCkptShort)
		} else if d.err == nil {
			d.err = fmt.Errorf("snapshot: read checkpoint at byte %d: %w", d.off, err)
		}
		return 0
	}
	d.crc.Write([]byte{b})
	d.off++
	return b
}

func (d *ckptReader) uv() uint64 {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		b := d.byte1()
		if d.err != nil {
			return 0
		}
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v
		}
	}
	d.fail("bad varint")
	return 0
}

func (d *ckptReader) u32() uint32 {
	v := d.uv()
	if v > 0xffffffff {
		d.fail("value %d does not fit 32 bits", v)
	}
	return uint32(v)
}

func (d *ckptReader) read(p []byte) {
	for i := range p {
		p[i] = d.byte1()
	}
}
