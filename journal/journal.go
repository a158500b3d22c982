// Package journal is a crash-safe write-ahead log for metadata, living in a
// region of a blockdev.Device (typically a blockdev.Slice).
//
// An engine appends opaque records (Append) and makes them durable with
// Commit, which is group commit: concurrent committers share one device
// write and one Flush. From time to time it writes its whole state as a
// checkpoint (Checkpoint), streamed into one of two ping-pong slots; the
// log space holding records the checkpoint covers is then reused. Open
// recovers: it hands the newest valid checkpoint to Replayer.LoadCheckpoint
// and then every valid record after it, in order, to Replayer.Replay.
//
// Guarantees, under the crash model of blockdev (a disk with a volatile
// write cache):
//   - a record whose Commit returned nil is replayed after any crash, exactly
//     once and in sequence order (unless a later checkpoint covers it);
//   - a torn, stale (from an earlier lap of the circular log, or written
//     before an earlier crash) or foreign tail is detected and cut, never
//     replayed; records are replayed in whole batches, so a record is
//     never replayed after a gap;
//   - a checkpoint is seen wholly or not at all: the old one stays current
//     until the new one is durable;
//   - recovery reads at most the log and the current checkpoint.
//
// Every on-disk structure carries a magic number, its own location and a
// CRC32C salted per structure type; the layout is documented in format.go.
// Decoders never panic and bound allocations by the region's size; bad
// metadata gives an error wrapping ErrCorrupt with its location.
//
// After a device error during a log or superblock write or a flush, the
// journal refuses further work (every call returns that error): the state
// of the device is unknown, and the caller must Close and Open again.
package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Sentinel errors, wrapped with context; test them with errors.Is.
var (
	// ErrCorrupt: on-disk metadata failed validation. The message names
	// the structure and its location.
	ErrCorrupt = errors.New("journal: corrupt metadata")
	// ErrNoSpace: the record cannot fit the log even when empty, the
	// checkpoint does not fit its slot, or the device is too small.
	ErrNoSpace = errors.New("journal: no space")
	// ErrClosed: the journal was closed.
	ErrClosed = errors.New("journal: closed")
	// ErrTooLarge: a record is larger than MaxRecord.
	ErrTooLarge = errors.New("journal: record too large")
	// ErrReadOnly: the journal was opened with OpenReadOnly. It wraps
	// blockdev.ErrReadOnly.
	ErrReadOnly = fmt.Errorf("journal: opened read-only: %w", blockdev.ErrReadOnly)
)

// Options configures Format and Open. The zero value is a good default.
type Options struct {
	// PreCommit, if set, is called by the group-commit leader before it
	// writes records (and by Checkpoint before it switches slots), so an
	// engine can flush its data devices first (clone: flush destination,
	// then metadata). An error fails that commit; nothing is written.
	PreCommit func() error
	// CheckpointAt is the log fill fraction (0..1] at which NeedCheckpoint
	// fires. 0 means 0.5.
	CheckpointAt float64
	// CheckpointSize is the size in bytes of each of the two checkpoint
	// slots, used by Format (Open reads it from the superblock). It is
	// rounded up to the block size. 0 means a quarter of the device each,
	// leaving about half of it to the log.
	CheckpointSize int64
}

// Replayer receives the recovered state on Open.
type Replayer interface {
	// LoadCheckpoint receives the newest valid checkpoint, if there is one.
	// It is called first and at most once; the stream's length and
	// checksum have been verified before the call.
	LoadCheckpoint(r io.Reader) error
	// Replay receives every valid record after the checkpoint, in sequence
	// order. The journal reuses payload after Replay returns.
	Replay(seq uint64, payload []byte) error
}

// Stats are counters since Format or Open, and the log's state now.
type Stats struct {
	Records         uint64  // records written to the log
	Bytes           uint64  // log bytes written (headers and padding included)
	Commits         uint64  // Commit calls that returned nil
	Flushes         uint64  // device flushes issued by group commit
	RecordsPerFlush float64 // Records / Flushes
	// Fill is the fraction of the log in use: written records not yet
	// covered by a durable checkpoint, plus space reserved by appended
	// records not yet written.
	Fill            float64
	Checkpoints     uint64 // checkpoints completed
	CheckpointBytes int64  // length of the current checkpoint
}

// Journal is an open journal. Its methods are safe for concurrent use.
type Journal struct {
	dev       blockdev.Device
	opts      Options
	bs        int64
	logOff    int64
	logSize   int64
	slotSize  int64
	id        uint64
	epoch     uint64 // this Open's epoch; constant
	readOnly  bool   // OpenReadOnly: nothing is ever written
	threshold float64
	// batchTarget is the record bytes past which Append starts a new
	// batch: batchTarget, or less in tests that want many batches per
	// commit round.
	batchTarget int64

	// ckptMu serialises Checkpoint and guards sb and ckptBuf. Lock order:
	// ckptMu before mu.
	ckptMu  sync.Mutex
	sb      superblock // current durable superblock
	ckptBuf []byte     // chunk buffer of the checkpoint writer

	// io counts goroutines doing device I/O for the journal (a commit
	// leader, a checkpoint) so that Close can wait for them. Add is called
	// under mu while !closed.
	io sync.WaitGroup

	mu        sync.Mutex // guards st
	st        state
	roundDone *sync.Cond // on mu: a commit round ended, or Close
}

// state is the journal's mutable state, guarded by Journal.mu.
type state struct {
	closed     bool
	err        error  // sticky device error
	lastSeq    uint64 // last appended sequence
	durableSeq uint64 // every record <= durableSeq is durable (or checkpointed)
	ckptUpTo   uint64 // upTo of the current durable checkpoint
	ckptBytes  int64

	pending  []*batch // appended, not yet taken by a leader; the last is open
	spare    []*batch // reused slice for the leader's take
	free     []*batch // recycled batch buffers
	reserved int64    // worst-case log bytes of pending batches

	head, tail int64 // apos: oldest byte still needed; next batch position
	spans      spanRing

	writing  bool          // a commit leader is at work
	roundGen uint64        // incremented (and roundDone broadcast) when a round ends
	space    chan struct{} // closed (and replaced) when log space is freed
	done     chan struct{} // closed by Close
	need     chan struct{} // NeedCheckpoint's channel; closed by Close

	records, bytes, commits, flushes, checkpoints uint64
}

// geometry computes the layout for a region of size bytes.
func geometry(size int64, bs int, slot int64) (superblock, error) {
	b := int64(bs)
	if slot <= 0 {
		slot = size / 4 / b * b
	}
	slot = roundUp(slot, b)
	logOff := 2*b + 2*slot
	if slot <= 0 || logOff > size || size-logOff < minLogBlocks*b {
		return superblock{}, fmt.Errorf("%w: journal: region of %d bytes too small for two %d-byte checkpoint slots and a log of %d blocks",
			ErrNoSpace, size, slot, minLogBlocks)
	}
	return superblock{
		blockSize: uint32(bs),
		size:      uint64(size),
		slotSize:  uint64(slot),
		logOff:    uint64(logOff),
		logSize:   uint64(size - logOff),
	}, nil
}

// Format writes a new, empty journal over the whole of dev and returns it
// open. Whatever dev held is lost. Format is not crash-atomic: a crash
// during it may leave a device that Open rejects.
func Format(dev blockdev.Device, opts Options) (*Journal, error) {
	sb, err := geometry(dev.Size(), dev.BlockSize(), opts.CheckpointSize)
	if err != nil {
		return nil, err
	}
	sb.id = rand.Uint64() | 1
	sb.epoch = 1
	sb.gen = 1
	j := newJournal(dev, opts, sb, scanResult{})
	if err := j.writeSuperblock(&sb); err != nil {
		return nil, fmt.Errorf("journal: format: %w", err)
	}
	return j, nil
}

// Open opens the journal on dev and recovers: it loads the newest valid
// checkpoint into r, replays every valid record after it into r, cuts any
// torn or stale tail, and durably starts a new epoch so that later writes
// can never be confused with what a crash left behind. Its I/O is bounded
// by the log's and the checkpoint's size.
func Open(dev blockdev.Device, opts Options, r Replayer) (*Journal, error) {
	sb, res, err := replay(dev, opts, r)
	if err != nil {
		return nil, err
	}
	j := newJournal(dev, opts, sb, scanResult{})
	// Start a new epoch, durably, before any batch of it can be written.
	next := sb
	next.gen++
	next.epoch++
	if err := j.writeSuperblock(&next); err != nil {
		return nil, fmt.Errorf("journal: open: %w", err)
	}
	return newJournal(dev, opts, next, res), nil
}

// OpenReadOnly recovers the journal on dev for inspection, as Open does
// (the newest valid checkpoint into r, then every valid record after it)
// but without writing anything: no new epoch, no tail cut, no superblock
// update, so dev may be a blockdev.ReadOnly view or metadata another
// process owns. The journal it returns answers LastSeq and Stats; Append
// and Checkpoint fail with ErrReadOnly (Commit has nothing to commit).
// Close it as usual.
//
// What it replays is exactly what Open would replay now. Inspecting a
// journal that another process is writing sees a consistent prefix at
// best: a batch in flight reads as a torn tail and is left out.
func OpenReadOnly(dev blockdev.Device, opts Options, r Replayer) (*Journal, error) {
	sb, res, err := replay(dev, opts, r)
	if err != nil {
		return nil, err
	}
	j := newJournal(dev, opts, sb, res)
	j.readOnly = true
	return j, nil
}

// replay reads the superblock, loads the checkpoint into r and replays the
// log after it, reading only.
func replay(dev blockdev.Device, opts Options, r Replayer) (superblock, scanResult, error) {
	sb, err := readSuperblock(dev)
	if err != nil {
		return sb, scanResult{}, err
	}
	j := newJournal(dev, opts, sb, scanResult{})
	if sb.ckpt.gen != 0 {
		if err := j.loadCheckpoint(r); err != nil {
			return sb, scanResult{}, err
		}
	}
	res, err := j.scan(sb.ckpt, r.Replay)
	return sb, res, err
}

// ReadOnly reports whether the journal was opened with OpenReadOnly.
func (j *Journal) ReadOnly() bool { return j.readOnly }

// readSuperblock reads both copies and returns the valid one with the
// highest generation, checked against dev's geometry.
func readSuperblock(dev blockdev.Device) (superblock, error) {
	bs := dev.BlockSize()
	if dev.Size() < 2*int64(bs) {
		return superblock{}, corruptf("device of %d bytes holds no journal", dev.Size())
	}
	buf := make([]byte, 2*bs)
	if _, err := dev.ReadAt(buf, 0); err != nil {
		return superblock{}, fmt.Errorf("journal: read superblock: %w", err)
	}
	var best superblock
	var errs []error
	for i := range 2 {
		sb, err := decodeSuperblock(buf[i*bs:(i+1)*bs], int64(i*bs))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if sb.gen > best.gen {
			best = sb
		}
	}
	if best.gen == 0 {
		return best, errors.Join(errs...)
	}
	if best.blockSize != uint32(bs) || best.size != uint64(dev.Size()) {
		return superblock{}, corruptAt("superblock", int64(best.location), "geometry (size %d, block %d) does not match the device (size %d, block %d)", best.size, best.blockSize, dev.Size(), bs)
	}
	return best, nil
}

func newJournal(dev blockdev.Device, opts Options, sb superblock, res scanResult) *Journal {
	j := &Journal{
		dev:         dev,
		opts:        opts,
		bs:          int64(sb.blockSize),
		logOff:      int64(sb.logOff),
		logSize:     int64(sb.logSize),
		slotSize:    int64(sb.slotSize),
		id:          sb.id,
		epoch:       sb.epoch,
		threshold:   opts.CheckpointAt,
		batchTarget: batchTarget,
		sb:          sb,
	}
	if j.threshold <= 0 || j.threshold > 1 {
		j.threshold = 0.5
	}
	j.roundDone = sync.NewCond(&j.mu)
	st := &j.st
	st.lastSeq = max(sb.ckpt.upTo, res.lastSeq)
	st.durableSeq = st.lastSeq
	st.ckptUpTo = sb.ckpt.upTo
	st.ckptBytes = int64(sb.ckpt.length)
	st.head = int64(sb.ckpt.start)
	st.tail = max(res.tail, st.head)
	st.spans = res.spans
	st.space = make(chan struct{})
	st.done = make(chan struct{})
	st.need = make(chan struct{}, 1)
	j.signalNeedLocked()
	return j
}

// writeSuperblock writes sb to copy 0, flushes, then to copy 1 and flushes,
// so that at every instant one copy is whole and a crash leaves the old
// state or the new one.
func (j *Journal) writeSuperblock(sb *superblock) error {
	buf := blockdev.AlignedBuffer(int(sb.blockSize))
	for i := range uint64(2) {
		sb.location = i * uint64(sb.blockSize)
		sb.encode(buf)
		if _, err := j.dev.WriteAt(buf, int64(sb.location)); err != nil {
			return err
		}
		if err := j.dev.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// usableLocked returns why the journal cannot take new work, or nil.
func (j *Journal) usableLocked() error {
	if j.st.err != nil {
		return j.st.err
	}
	if j.st.closed {
		return ErrClosed
	}
	if j.readOnly {
		return ErrReadOnly
	}
	return nil
}

// waitLocked releases mu until ch is closed, ctx is done or the journal is
// closed; it returns with mu held.
func (j *Journal) waitLocked(ctx context.Context, ch <-chan struct{}) error {
	done := j.st.done
	j.mu.Unlock()
	defer j.mu.Lock()
	select {
	case <-ch:
		return nil
	case <-done:
		return nil // the caller sees closed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fillLocked is the fraction of the log in use or reserved.
func (j *Journal) fillLocked() float64 {
	return float64(j.st.tail-j.st.head+j.st.reserved) / float64(j.logSize)
}

// signalNeedLocked signals NeedCheckpoint if the fill passed the threshold.
func (j *Journal) signalNeedLocked() {
	if j.st.closed || j.fillLocked() < j.threshold {
		return
	}
	select {
	case j.st.need <- struct{}{}:
	default:
	}
}

// NeedCheckpoint returns a channel that receives a value when the log's fill
// passes Options.CheckpointAt (at most one value is buffered), and is
// closed by Close, so `for range j.NeedCheckpoint()` is a checkpointer's
// loop. Appends blocked on a full log also signal it.
func (j *Journal) NeedCheckpoint() <-chan struct{} { return j.st.need }

// LastSeq returns the sequence number of the last record appended (after
// Open: the last one recovered, or the checkpoint's upTo if that is later).
func (j *Journal) LastSeq() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.st.lastSeq
}

// Stats returns counters and the log's fill.
func (j *Journal) Stats() Stats {
	j.mu.Lock()
	defer j.mu.Unlock()
	s := Stats{
		Records:         j.st.records,
		Bytes:           j.st.bytes,
		Commits:         j.st.commits,
		Flushes:         j.st.flushes,
		Fill:            j.fillLocked(),
		Checkpoints:     j.st.checkpoints,
		CheckpointBytes: j.st.ckptBytes,
	}
	if s.Flushes > 0 {
		s.RecordsPerFlush = float64(s.Records) / float64(s.Flushes)
	}
	return s
}

// Close stops the journal: waiting Append and Commit calls return ErrClosed,
// and Close waits for a commit or checkpoint already writing to finish its
// device I/O (a checkpoint's write function sees ErrClosed from its
// writer). It does not checkpoint, and records appended but not committed
// may be lost. It does not close the device. A second Close returns
// ErrClosed.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.st.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	j.st.closed = true
	close(j.st.done)
	close(j.st.need)
	j.roundDone.Broadcast()
	j.mu.Unlock()
	j.io.Wait()
	return nil
}
