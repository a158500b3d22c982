package snapshot

// The checkpoint image: the store's small state (branches and volumes),
// streamed into a journal slot at each tree commit. The index is not in
// it: it lives in the metadata region, whose commit records the journal
// record it covers.
//
//	offset size  field
//	     0    8  magic "BSNAPCKP"
//	     8    4  version (5), little-endian
//	    12    -  uv next volume id, uv next branch id
//	          -  uv branch count; per branch: uv id, uv parent, uv parent epoch,
//	             uv last epoch, uv live (0/1), then its chunk-group summary:
//	             uv count of non-zero words; per word: uv index (delta from
//	             the previous word's index, the first from 0), uv word. A root
//	             branch (CreateVolume) has parent = id and parent epoch 0
//	          -  uv volume count; per volume (the origin excluded): uv id,
//	             uv kind, uv branch, uv epoch, uv flags (bit 0 hidden, bit 1
//	             protected, bit 2 size follows), sv created, uv parent,
//	             [uv size in bytes, with flag bit 2; images without it were
//	             written before volumes had sizes: every volume then had the
//	             origin's], uv name length, name
//	          -  the origin's and its snapshots' space counters (version 4;
//	             layout in counters.go)
//	          -  the other branches' space counters (version 5; layout in
//	             clonecounters.go)
//	          -  a zero byte (version 1 had the entry runs here: see
//	             loadRuns, which Migrate uses)
//	     -    4  CRC32C, salted with saltCheckpoint, of every byte before it
//
// Version 2 had no chunk-group summaries: Open rebuilds them, and the
// origin's preserved epochs, by one walk of the chunk tree (loadCheckpoint
// sets rebuild). Version 3 images carry them, so Open walks nothing: the
// preserved epochs are looked up in the tree on first use (preserve.go).
// Version 3 had no space counters: Open rebuilds them by one walk of the
// origin's entries (settleCounters). Version 4 had the origin's only: Open
// builds the other branches' by one walk of their entries.
//
// Version 1 (format version 1 stores) held the whole index after the
// volumes, as entry runs in (branch, epoch, chunk) order, each: a tag byte
// (1: new branch/epoch follows, 2: same as the previous run), [uv branch,
// uv epoch], uv chunk (tag 2: delta from the previous run's end), uv
// count, uv location (0 zero, 1 inherit, else 2 + zigzag of the delta from
// the previous data run's end); tag 0 ended the runs.

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"slices"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

const (
	checkpointMagic      = "BSNAPCKP"
	checkpointVersion    = 5
	noBranchCtrVersion   = 4 // images without the branch counters (clonecounters.go)
	noCounterVersion     = 3 // images without the space counters (counters.go)
	noGroupsVersion      = 2 // images without chunk-group summaries either
	oldCheckpointVersion = 1
)

// capture is a tree commit frozen under mu at journal record upTo, with
// the small state as of that record: the checkpointer writes it without
// holding any lock of the store.
type capture struct {
	upTo     uint64
	fz       *meta.Frozen // nil: the tree did not change
	nextVol  uint64
	nextBr   uint32
	branches []branchRec
	volumes  []volRec
	ctr      counters
	// view, when set, receives a view of the written commit before the
	// capture ends (readView).
	view **meta.View
	// paced: the capture is written by a goroutine that is not a writer
	// (the checkpointer, an admin call's readView, Checkpoint), which
	// yields the processor as it goes (Frozen.WritePaced, endCapture,
	// releaseFreed). A writer's own tree commit, under its locks, is not.
	paced bool
	// freed is closed once the capture's checkpoint has freed the log it
	// covers, or has failed (the store is then failed): before
	// releaseFreed and endCapture, which take locks, so that a writer
	// holding mu may wait for it (logRoomLocked).
	freed chan struct{}
}

// volRec is a volume's persistent fields.
type volRec struct {
	id, parent, created int64
	name                string
	kind                Kind
	branch, epoch       uint32
	hidden, protected   bool
	size                int64
}

// flagCkptSize is the volume flag bit of the checkpoint image that says a
// size follows.
const flagCkptSize = 4

type branchRec struct {
	id, parent, parentEpoch, lastEpoch uint32
	live                               bool
	// groups are the branch's chunk-group summary words as of the
	// capture. They are shared with the branch, which copies them before
	// it sets another bit (markGroups), so the capture costs no copy.
	groups []uint64
}

// smallStateLocked copies the branch and volume tables. Called with mu
// held exclusively (it hands each branch's summary words to the capture).
func (s *Store) smallStateLocked(c *capture) {
	c.nextVol, c.nextBr = s.nextVol, s.nextBranch
	for _, br := range s.branches {
		r := branchRec{br.id, br.parent, br.parentEpoch, br.lastEpoch, br.live, br.groups.bits}
		if br.root {
			r.parent, r.parentEpoch = br.id, 0
		}
		c.branches = append(c.branches, r)
		br.groupsCaptured = br.ownGroups // the capture now shares the words
	}
	slices.SortFunc(c.branches, func(a, b branchRec) int { return int(int64(a.id) - int64(b.id)) })
	c.volumes = s.volRecsLocked()
	c.ctr = s.ctr.clone()
}

// maxVolChanged bounds Store.volChanged.
const maxVolChanged = 4096

// volRecsLocked returns the records of every volume but the origin, by
// id: the last ones made, patched for the volumes changed since. The
// caller must not change them: the last capture may still hold them, so
// a patch changes a copy. Called with mu held exclusively.
func (s *Store) volRecsLocked() []volRec {
	switch {
	case s.volRecs == nil || s.volAll || len(s.volChanged) > len(s.volRecs)/16+16:
		// Patching that many would cost more than making them all.
		s.volRecs = s.makeVolRecs()
	case len(s.volChanged) > 0:
		recs := slices.Clone(s.volRecs)
		for _, id := range s.volChanged {
			i, found := slices.BinarySearchFunc(recs, int64(id), func(r volRec, id int64) int { return cmp.Compare(r.id, id) })
			v := s.volumes[id]
			switch {
			case v == nil || v.kind == KindOrigin:
				if found {
					recs = slices.Delete(recs, i, i+1)
				}
			case found:
				recs[i] = volRecOf(v)
			default:
				recs = slices.Insert(recs, i, volRecOf(v))
			}
		}
		s.volRecs = recs
	}
	s.volChanged, s.volAll = s.volChanged[:0], false
	return s.volRecs
}

// makeVolRecs makes the records of every volume but the origin, by id.
// Called with mu held, shared or exclusively.
func (s *Store) makeVolRecs() []volRec {
	recs := make([]volRec, 0, len(s.volumes))
	for _, v := range s.volumes {
		if v.kind != KindOrigin {
			recs = append(recs, volRecOf(v))
		}
	}
	slices.SortFunc(recs, func(a, b volRec) int { return cmp.Compare(a.id, b.id) })
	return recs
}

// volRecOf is v's record. Called with mu held.
func volRecOf(v *volume) volRec {
	return volRec{id: int64(v.id), name: v.name, kind: v.kind, branch: v.branch,
		epoch: v.epoch, hidden: v.hidden, protected: v.protected, created: v.created, parent: int64(v.parent),
		size: v.size.Load()}
}

// captureLocked freezes a tree commit at the last record appended. Called
// with mu held exclusively and no capture outstanding; it marks one
// outstanding until writeCheckpoint ends it. A freeze that fails fails
// the store.
func (s *Store) captureLocked() (capture, error) {
	var c capture
	if s.j != nil {
		c.upTo = s.j.LastSeq()
	}
	s.smallStateLocked(&c)
	fz, err := s.alloc.freeze(c.upTo)
	if err != nil {
		return c, s.fail(metaErr("freeze tree commit", err))
	}
	c.fz = fz
	c.freed = make(chan struct{})
	s.capOut, s.capFreed = true, c.freed
	s.lastTreeSeq, s.treeChanges = c.upTo, 0
	return c, nil
}

// maybeCaptureLocked hands a capture to the checkpointer when the journal
// asks for a checkpoint, when treeCommitRecords records or index changes
// were logged since the last tree commit, or when those changes touched
// treeCommitLeaves leaves (the last two bound what Open replays after a
// crash). Capturing here, under mu, means the checkpointer never needs mu
// to freeze.
func (s *Store) maybeCaptureLocked() {
	if s.capOut {
		return
	}
	if s.j.LastSeq()-s.lastTreeSeq >= treeCommitRecords || s.treeChanges >= treeCommitRecords ||
		s.m.TouchedLeaves() >= s.opts.leafBound() {
		s.postCaptureLocked()
		return
	}
	select {
	case _, ok := <-s.j.NeedCheckpoint():
		if ok {
			s.postCaptureLocked()
		}
	default:
	}
}

// treeCommitRecords is how many journal records, or index changes, may
// be logged before a tree commit starts in the background, whatever the
// commit interval: Open after a crash replays at most about this many
// (plus those logged while that commit runs).
const treeCommitRecords = 1 << 16

// treeCommitLeaves is how many leaves the changes logged since the last
// tree commit may touch before a tree commit starts in the background.
// Replay's cost is the leaves it touches (each decoded, copied and
// encoded again), not the changes: random changes to a tree much larger
// than the cache touch a leaf each, so at 10M random versions 65,536
// changes touch most of its leaves. A writer that finds twice this many
// touched by the records not yet in a durable tree commit (the frozen
// commit's and the open transaction's) waits for that commit first
// (makeLogRoom), so Open after a crash replays at most about
// 2*treeCommitLeaves leaves, whatever the tree's size or the writes'
// order (docs/metadata.md section 17).
const treeCommitLeaves = 8192

// leafBound is treeCommitLeaves, or the test's own bound.
func (o *Options) leafBound() int { return cmp.Or(o.treeLeaves, treeCommitLeaves) }

// postCaptureLocked hands the checkpointer a capture of the state now.
// Called with mu held and no capture outstanding, so the channel (one
// slot) is empty. Once Close has canceled s.ctx nothing is posted: the
// checkpointer may have exited, and a capture left in its channel would
// keep capOut set, so a tree commit waiting for it (the collector's, which
// Close waits for) would wait for ever. Close writes a capture posted just
// before the cancel, and then the final tree commit, itself.
func (s *Store) postCaptureLocked() {
	if s.ctx.Err() != nil || len(s.capTaken) > 0 {
		return // capTaken: the checkpointer may be waiting for mu (store.go)
	}
	c, err := s.captureLocked()
	if err != nil {
		return
	}
	c.paced = true
	s.ckptCh <- c
}

// checkpointer writes the captures it is handed.
func (s *Store) checkpointer() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			// A capture posted before Close (the select may pick
			// this case with one waiting) is written now: a tree
			// commit that waits for it (the collector's) would
			// otherwise keep Close waiting for ever.
			s.dropCapture()
			return
		case c := <-s.ckptCh:
			if err := s.writeCheckpoint(c); err != nil {
				_ = s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
				return
			}
		}
	}
}

// dropCapture ends a capture left in the checkpointer's channel (Close,
// after the checkpointer stopped): written if the store is sound,
// abandoned otherwise.
func (s *Store) dropCapture() {
	select {
	case c := <-s.ckptCh:
		if s.failed.Load() == nil {
			_ = s.writeCheckpoint(c) // a failure fails the store, which Close reports
			return
		}
		if c.fz != nil {
			c.fz.Abandon(errors.New("snapshot: the store failed"))
		}
		close(c.freed)
		s.endCapture(c)
	default:
	}
}

// Checkpoint commits the metadata tree now and waits for it (tests and
// tools; the store does it by itself in the background).
func (s *Store) Checkpoint(ctx context.Context) error {
	if err := s.writable(); err != nil {
		return err
	}
	return s.treeCommitPaced(ctx, true)
}

// treeCommit freezes a tree commit (waiting for one outstanding to end
// first) and writes it. Called with no lock of the store held but branch
// gates and stripes.
func (s *Store) treeCommit(ctx context.Context) error { return s.treeCommitPaced(ctx, false) }

// treeCommitPaced is treeCommit whose capture is paced (capture.paced).
func (s *Store) treeCommitPaced(ctx context.Context, paced bool) error {
	s.mu.Lock()
	for s.capOut && s.failed.Load() == nil {
		s.capDone.Wait()
	}
	if err := ctx.Err(); err != nil {
		s.mu.Unlock()
		return err
	}
	if p := s.failed.Load(); p != nil {
		s.mu.Unlock()
		return *p
	}
	c, err := s.captureLocked()
	s.mu.Unlock()
	if err != nil {
		return err
	}
	c.paced = paced
	return s.writeCheckpoint(c)
}

// writeCheckpoint writes capture c: it makes the records up to c.upTo
// durable in the journal (so the tree never covers a record the journal
// could lose), writes the frozen tree commit (pages, flush, the tree's
// superblock, which records c.upTo, flush), writes the small state as the
// journal's checkpoint at c.upTo (which trims the log), and then lets the
// data chunks freed by durable commits be reused. A crash between the
// tree commit and the journal checkpoint is safe: Open replays only the
// small-state changes of the records the tree covers. It runs to the end
// even when the store is closing: an unwritten frozen commit would block
// every later one.
func (s *Store) writeCheckpoint(c capture) error {
	defer s.endCapture(c)
	return s.writeCapture(c, true)
}

// writeCaptureLocked captures and writes a tree commit holding mu, for a
// writer that needs log space while a capture it ended still has its own
// writer waiting for mu (logRoomLocked). It ends the capture itself and
// leaves the release of freed chunks (which takes reclaim, before mu in
// the lock order) to the next checkpoint.
func (s *Store) writeCaptureLocked() error {
	c, err := s.captureLocked()
	if err != nil {
		return err
	}
	err = s.writeCapture(c, false)
	if s.capFreed == c.freed {
		s.capOut = false
		s.capDone.Broadcast()
	}
	return err
}

// writeCapture is writeCheckpoint without the capture's end; release
// says whether to make the freed chunks reusable after.
func (s *Store) writeCapture(c capture, release bool) error {
	freed := false
	defer func() {
		if !freed {
			close(c.freed) // failed: the store is failed too
		}
	}()
	ctx := context.Background()
	if s.j != nil {
		if err := s.j.Commit(ctx); err != nil {
			if c.fz != nil {
				c.fz.Abandon(err)
			}
			return s.fail(fmt.Errorf("snapshot: commit: %w", err))
		}
	}
	if c.fz != nil {
		write := c.fz.Write
		if c.paced {
			write = c.fz.WritePaced
		}
		if err := write(); err != nil {
			return s.fail(metaErr("tree commit", err))
		}
	}
	if c.view != nil {
		*c.view = s.m.View() // the commit just written: no other can start before endCapture
	}
	s.setDurable(c.upTo)
	if s.j != nil {
		if err := s.j.Checkpoint(ctx, c.upTo, func(w io.Writer) error {
			_, err := c.encode(w)
			return err
		}); err != nil {
			return s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
		}
	}
	freed = true
	close(c.freed)
	if release {
		s.releaseFreed(c.paced)
	}
	return nil
}

// endCapture marks capture c ended, unless a writer waiting for it has
// done so already and captured again (logRoomLocked).
func (s *Store) endCapture(c capture) {
	s.mu.Lock()
	if s.capFreed == c.freed {
		s.capOut = false
		s.capDone.Broadcast()
	}
	if i := slices.Index(s.capTaken, c.freed); i >= 0 {
		s.capTaken = slices.Delete(s.capTaken, i, i+1) // a writer ended it first (logRoomLocked)
	}
	if c.paced {
		s.mu.UnlockYield()
	} else {
		s.mu.Unlock()
	}
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
	e := newEncoder(w)
	c.encodeTo(e)
	err := e.finish()
	return e.n + 4, err
}

// newEncoder starts an image on w: its checksum is salted.
func newEncoder(w io.Writer) *encoder {
	e := &encoder{w: bufio.NewWriterSize(w, 64<<10), crc: crc32.New(castagnoli)}
	var salt [4]byte
	binary.LittleEndian.PutUint32(salt[:], saltCheckpoint)
	e.crc.Write(salt[:])
	return e
}

// finish appends the checksum and flushes.
func (e *encoder) finish() error {
	binary.LittleEndian.PutUint32(e.tmp[:4], e.crc.Sum32())
	if e.err == nil {
		_, e.err = e.w.Write(e.tmp[:4])
	}
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.err
}

func (c *capture) encodeTo(e *encoder) { c.encodeVersion(e, checkpointVersion) }

// encodeVersion writes the image in format version v: before version 3,
// without the chunk-group summaries; before version 4, without the space
// counters (tests write older images with it).
func (c *capture) encodeVersion(e *encoder, v uint32) {
	var hdr [12]byte
	copy(hdr[:], checkpointMagic)
	binary.LittleEndian.PutUint32(hdr[8:], v)
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
		if v >= noCounterVersion {
			encodeGroups(e, b.groups)
		}
	}
	e.uv(uint64(len(c.volumes)))
	for i := range c.volumes {
		v := &c.volumes[i]
		e.uv(uint64(v.id))
		e.uv(uint64(v.kind))
		e.uv(uint64(v.branch))
		e.uv(uint64(v.epoch))
		e.uv(b2u(v.hidden) | b2u(v.protected)<<1 | flagCkptSize)
		e.sv(v.created)
		e.uv(uint64(v.parent))
		e.uv(uint64(v.size))
		e.uv(uint64(len(v.name)))
		e.bytes([]byte(v.name))
	}
	if v >= noBranchCtrVersion {
		c.ctr.encodeTo(e)
	}
	if v >= checkpointVersion {
		c.ctr.encodeBranches(e)
	}
	e.byte1(0) // no entry runs: the index is in the metadata region
}

// encodeGroups writes a chunk-group summary: its non-zero words, each with
// its index as a delta.
func encodeGroups(e *encoder, bits []uint64) { encodeSparse(e, bits, e.uv) }

// encodeSparse writes the count of vals' non-zero values, then each: its
// index as a delta from the previous one's (the first from 0), and the
// value as put writes it.
func encodeSparse[T uint64 | int64](e *encoder, vals []T, put func(T)) {
	n := 0
	for _, w := range vals {
		if w != 0 {
			n++
		}
	}
	e.uv(uint64(n))
	prev := 0
	for i, w := range vals {
		if w != 0 {
			e.uv(uint64(i - prev))
			put(w)
			prev = i
		}
	}
}

// replayer adapts Store to journal.Replayer.
type replayer Store

func (r *replayer) LoadCheckpoint(rd io.Reader) error { return (*Store)(r).loadCheckpoint(rd) }

// Replay applies a record; of those the tree's last commit covers, only
// the branch and volume changes (the tree holds their index changes) and
// the puts' chunk-group bits (the checkpoint image, which may predate the
// tree's commit, lacks them).
func (r *replayer) Replay(seq uint64, payload []byte) error {
	s := (*Store)(r)
	ops, err := decodeRecord(s.replayOps[:0], payload, fmt.Sprintf("journal record %d", seq))
	if err != nil {
		return err
	}
	s.replayOps = ops
	if seq > s.treeSeq {
		if s.migrating {
			return s.applyOps(ops, seq, true)
		}
		return s.replayDeferred(ops, seq) // replay.go
	}
	// The checkpoint's counters lack the index changes of the records
	// the tree holds: Open rebuilds them.
	s.ctr.stale = true
	for i := range ops {
		o := &ops[i]
		switch o.kind {
		case opPut:
			if err := s.markCovered(o, seq); err != nil {
				return err
			}
		case opDel, opMove:
		default:
			if err := s.applyOp(o, seq, true); err != nil {
				return err
			}
		}
	}
	return nil
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

// ReadByte makes the reader an io.ByteReader for binary.ReadUvarint, so
// the image and the journal records share one varint decoder.
func (d *ckptReader) ReadByte() (byte, error) {
	b := d.byte1()
	return b, d.err
}

func (d *ckptReader) uv() uint64 {
	if d.err != nil {
		return 0
	}
	v, err := binary.ReadUvarint(d)
	if d.err != nil {
		return 0
	}
	if err != nil {
		d.fail("bad varint")
		return 0
	}
	return v
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
