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
	c := capture{ix: s.ix.clone(), nextVol: s.nextVol, nextBr: s.nextBranch}
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
// never needs mu, so an Append blocked on a full log (which holds mu) is
// always freed by the checkpoint already under way.
func (s *Store) maybeCaptureLocked() {
	select {
	case _, ok := <-s.j.NeedCheckpoint():
		if !ok || s.ckptBusy.Load() {
			return
		}
	default:
		return
	}
	s.ckptBusy.Store(true)
	s.ckptCh <- s.captureLocked() // buffered, and only sent when not busy
}

// checkpointer writes the captures it is handed.
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
	return s.writeCheckpoint(ctx, c)
}

// writeCheckpoint writes c unless a newer checkpoint has been written.
func (s *Store) writeCheckpoint(ctx context.Context, c capture) error {
	s.ckptMu.Lock()
	defer s.ckptMu.Unlock()
	if c.upTo < s.ckptUpTo {
		return nil
	}
	if err := s.j.Checkpoint(ctx, c.upTo, func(w io.Writer) error { return c.encode(w) }); err != nil {
		return err
	}
	s.ckptUpTo = c.upTo
	return nil
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

func (c *capture) encode(w io.Writer) error {
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
	return e.err
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
