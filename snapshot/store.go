// Package snapshot is the shared snapshot store: one origin device holding
// the live data in place, and one store device holding every snapshot and
// writable clone of it, with unlimited snapshots, clones of clones to any
// depth, metadata-only background delete and diffs between snapshots.
//
// Data model (docs/design.md, "The shared snapshot store"). Every writable volume is a branch: the
// origin is branch 0, a clone is a branch whose parent is a (branch,
// snapshot) point. A snapshot of a branch is a number (an epoch) in that
// branch's increasing sequence. One ordered index keyed (branch, chunk,
// epoch) maps to store chunks: entry (b, c, e) serves the snapshots of b
// numbered in (previous entry's epoch, e]; a clone's live chunks use the
// largest epoch. So an origin write copies a chunk at most once however many
// snapshots exist, and any read is one index seek per level of clone depth
// at most, with a per-branch summary that lets levels without entries be
// skipped without a seek.
//
// Crash safety: the index lives in memory; every change is a journal record
// (package journal) and the whole index is checkpointed in the background.
// An origin write that needs a copy writes the copy to the store and
// appends the record; its data waits in memory (the origin buffer) until a
// commit (store flush, then the record) is durable, and only then reaches
// the origin device. Open
// replays the journal (never a scan of the data) and rebuilds the
// allocation bitmap from the index.
package snapshot

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/internal/journalerr"
	"github.com/blocksnap/blocksnap/journal"
)

// Sentinel errors; test them with errors.Is.
var (
	ErrCorrupt         = errors.New("snapshot: corrupt metadata")
	ErrNoSpace         = fmt.Errorf("snapshot: store is full: %w", blockdev.ErrNoSpace)
	ErrNotFound        = errors.New("snapshot: no such volume")
	ErrExists          = errors.New("snapshot: name already in use")
	ErrInvalidSnapshot = errors.New("snapshot: snapshot is invalid or deleted")
	ErrBadOptions      = errors.New("snapshot: bad options")
	ErrClosed          = fmt.Errorf("snapshot: store closed: %w", blockdev.ErrClosed)
	ErrReadOnly        = blockdev.ErrReadOnly
)

// NoSpacePolicy says what an origin write does when the store has no room
// for the copy that a snapshot needs.
type NoSpacePolicy uint8

const (
	// NoSpaceFailWrite (the default) fails the origin write with ErrNoSpace
	// and leaves the origin and every snapshot unchanged.
	NoSpaceFailWrite NoSpacePolicy = iota
	// NoSpaceInvalidate deletes the snapshots of the origin that needed the
	// copy (their open handles return ErrInvalidSnapshot) and lets the
	// write through, as dm-snapshot does. A snapshot that clones depend on
	// cannot be invalidated; if one needs the copy the write fails. The
	// policy covers data space only: a copy refused because the metadata
	// would outgrow its checkpoint slot fails the write with ErrNoSpace
	// under either policy (deleting snapshots frees that room only once
	// the collector has run).
	NoSpaceInvalidate
)

// Options configures Format and Open. The zero value is a good default.
type Options struct {
	// ChunkSize is the copy-on-write unit in bytes: a power of two from
	// 4 KiB to 1 MiB; 0 means 64 KiB. Format only (Open reads it).
	ChunkSize int
	// JournalSize is the journal region in bytes (checkpoint slots and
	// log); 0 means 1/32 of the store, at least 1 MiB and at most 2 GiB.
	// Format only.
	JournalSize int64
	// CommitInterval is how often pending metadata is committed in the
	// background; 0 means one second, negative disables it (commits then
	// happen on Flush, FUA and snapshot operations only).
	CommitInterval time.Duration
	// Transient keeps the index in memory only, with no journal: nothing
	// survives Close (a short-lived backup snapshot). Format writes a
	// superblock that says so, and a later Open of the store device fails
	// with ErrBadOptions (it never finds an earlier store there).
	Transient bool
	// NoSpace is the origin's behaviour when the store is full.
	NoSpace NoSpacePolicy
	// CheckpointAt is the journal fill fraction that starts a background
	// checkpoint: from 0.05 to 0.7; 0 means 0.5. Other values are refused
	// with ErrBadOptions: past 0.75 of the journal an operation must write
	// a checkpoint itself, in the foreground, before it may log (it never
	// waits for one under the store's lock), so a background checkpoint
	// that starts later than 0.7 would leave every checkpoint to the
	// foreground.
	CheckpointAt float64
	// ReadOnly opens the store for inspection (Open only): nothing is
	// written to either device, not even the journal's new epoch or the
	// end of an interrupted delete, so the devices may be blockdev.ReadOnly
	// views. Volumes read, List, Stat, Stats, Diff, ExportDiff and Check
	// work; every change (writes, discards, snapshots, clones, deletes,
	// renames, rollbacks, checkpoints) fails with ErrReadOnly.
	ReadOnly bool
	// OriginBuffer bounds, in bytes, the origin writes held in memory after
	// their copy-on-write, until a commit makes the copy durable and lets
	// them reach the origin device (rounded down to whole chunks, at least
	// one); 0 means 32 MiB, negative turns buffering off (each such write
	// then waits for its commit). Unused in transient mode.
	OriginBuffer int64
}

const (
	originVolumeID = 1
	originName     = "origin"
	nStripes       = 1024
	maxSegChunks   = 64 // chunks of one origin write handled (and committed) together
)

// paddedRW keeps stripe locks on separate cache lines.
type paddedRW struct {
	sync.RWMutex
	_ [40]byte
}

type paddedMu struct {
	sync.Mutex
	_ [56]byte
}

// Store is an open shared snapshot store. Its methods are safe for
// concurrent use.
type Store struct {
	origin, store blockdev.Device
	opts          Options
	geo           geometry
	cs            int64  // chunk size
	chunks        uint64 // origin chunks
	bs            int    // volume block size
	j             *journal.Journal
	jdev          *blockdev.SliceDevice

	// mu guards the index, the branch and volume tables and the collector's
	// queue. It is never held across device I/O, nor while waiting for
	// any, but by an Append that finds the log full despite makeLogRoom
	// (then a checkpoint that needs no lock frees it). Lock order: branch
	// gate, then clone stripe, then origin stripe, then fgMu, then
	// reclaim, then mu, then allocator.mu; ckptMu and the origin buffer's
	// drainMu are never held with mu.
	mu        sync.RWMutex
	ix        index
	branches  map[uint32]*branch
	volumes   map[uint64]*volume
	byName    map[string]uint64
	byPoint   map[point]uint64
	nextVol   uint64
	gcq       []gcTask
	deletes   map[uint64]*DeleteOp
	origVol   *volume
	b0        *branch
	replaying bool

	// nextBranch mirrors nextBr for applyOp.
	nextBranch uint32

	alloc *allocator
	// preserved[c] is the greatest epoch for which origin chunk c has been
	// copied (0: never). A write to c needs a copy iff the newest held
	// epoch of branch 0 is greater. It only grows (stale high values are
	// harmless: new snapshots get greater numbers). Guarded by the origin
	// stripe of c (written under mu as well).
	preserved []uint32

	originLocks [nStripes]paddedRW // per origin chunk: writers exclusive for a copy
	cloneLocks  [nStripes]paddedMu // per (branch, chunk) of a clone
	// reclaim: readers of store chunks hold it shared across the read;
	// freed chunks become reusable only under it exclusively, so a chunk is
	// never reused under a read in flight.
	reclaim sync.RWMutex

	bufs    sync.Pool // *[]byte of one chunk
	scratch sync.Pool // *scratch

	failed atomic.Pointer[error] // sticky metadata failure: reopen to recover
	// failCtx is canceled by the first failure and by Close. An Append
	// waits on it for log room: once the checkpointer has failed (and
	// stopped) no checkpoint will make room, and the waiter, holding mu,
	// would otherwise hang every other operation with it.
	failCtx    context.Context
	failCancel context.CancelFunc
	closed     atomic.Bool
	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	gcKick     chan struct{}
	ckptCh     chan capture
	gcIdle     *sync.Cond // broadcast when the collector's queue drains; uses mu
	ckptBusy   atomic.Bool
	// postedUpTo is the upTo of the last capture handed to the
	// checkpointer past emergencyFill; guarded by mu.
	postedUpTo uint64
	// fgMu serialises foreground checkpoints (makeLogRoom), so that writers
	// that find the journal full write one, not one each. Taken with no
	// lock of the store held but branch gates and stripes; mu, ckptMu and
	// reclaim are taken under it.
	fgMu sync.Mutex
	// emergencies counts foreground checkpoints written because the
	// journal passed emergencyFill, measures the foreground measures of
	// the metadata image near its slot (tests report them).
	emergencies, measures atomic.Int64
	// durableSeq is the last record known durable (a commit or a
	// checkpoint covered it): buffered origin writes preserved by records
	// up to it may reach the origin even after the store failed.
	durableSeq atomic.Uint64

	// The metadata bound: the checkpoint image is at most metaMark.bytes
	// (the size of the last checkpoint written, measured) plus the
	// worst-case growth of the operations applied since its capture
	// (metaGrowth, a running total written under mu, minus
	// metaMark.growth, its value at the capture). See metaRoomLocked.
	metaGrowth atomic.Int64
	metaMark   atomic.Pointer[metaMark]

	ckptMu   sync.Mutex // serialises checkpoints; never taken with mu held
	ckptUpTo uint64     // upTo of the last checkpoint written; guarded by ckptMu

	ob originBuf // origin writes waiting for their copy's commit

	locks    deviceLocks // the devices' locks, released by Close (lock.go)
	originRO bool        // the origin device refuses writes (lock.go); set before the store is handed out
}

// scratch is per-operation reusable memory for the write paths.
type scratch struct {
	ops []op
	rec []byte
	cow []cowChunk
	// reclaiming: the collector's record, which frees space and is not
	// refused for the metadata bound.
	reclaiming bool
}

type cowChunk struct {
	c     uint64
	loc   uint64
	e     *obEntry // the chunk's buffer entry (origin buffer on)
	fresh bool     // e was taken for this copy (not yet buffered)
}

func (o *Options) normalize() error {
	if o.ChunkSize == 0 {
		o.ChunkSize = 64 << 10
	}
	cs := o.ChunkSize
	if cs < minChunkSize || cs > maxChunkSize || cs&(cs-1) != 0 {
		return fmt.Errorf("%w: chunk size %d: a power of two from 4 KiB to 1 MiB", ErrBadOptions, cs)
	}
	if o.CommitInterval == 0 {
		o.CommitInterval = time.Second
	}
	if a := o.CheckpointAt; a != 0 && !(a >= minCheckpointAt && a <= maxCheckpointAt) { // NaN fails too
		return fmt.Errorf("%w: CheckpointAt %v: from %v to %v (0: 0.5)", ErrBadOptions, a, minCheckpointAt, maxCheckpointAt)
	}
	return nil
}

// The range of Options.CheckpointAt; emergencyFill lies above it.
const (
	minCheckpointAt = 0.05
	maxCheckpointAt = 0.7
)

// formatStore is Format once the devices are locked (lock.go).
func formatStore(origin, store blockdev.Device, opts Options) (*Store, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	if opts.ReadOnly {
		return nil, fmt.Errorf("%w: Format of a read-only store", ErrBadOptions)
	}
	cs := int64(opts.ChunkSize)
	g := geometry{chunkSize: uint32(cs), originSize: origin.Size(), storeSize: store.Size(), journalOff: superblockSize}
	if !opts.Transient {
		jl := opts.JournalSize
		if jl == 0 {
			jl = min(max(store.Size()/32, 1<<20), 2<<30)
		}
		g.journalLen = (jl + 4095) / 4096 * 4096
	}
	g.dataOff = (g.journalOff + g.journalLen + cs - 1) / cs * cs
	if origin.Size() <= 0 || g.dataOff >= store.Size() {
		return nil, fmt.Errorf("%w: store of %d bytes has no room for data after %d bytes of metadata", ErrBadOptions, store.Size(), g.dataOff)
	}
	g.dataChunks = uint64((store.Size() - g.dataOff) / cs)
	if g.dataChunks == 0 {
		return nil, fmt.Errorf("%w: store of %d bytes holds no data chunk", ErrBadOptions, store.Size())
	}
	_, _ = rand.Read(g.uuid[:])
	g.formatted = time.Now().UnixNano()
	g.transient = opts.Transient
	s := newStore(origin, store, opts, g)
	if opts.Transient {
		if err := writeSuperblock(store, &g); err != nil {
			return nil, err
		}
		s.start()
		return s, nil
	}
	jdev, err := blockdev.Slice(store, g.journalOff, g.journalLen)
	if err != nil {
		return nil, fmt.Errorf("snapshot: journal region: %w", err)
	}
	s.jdev = jdev
	j, err := journal.Format(jdev, s.journalOptions())
	if err != nil {
		return nil, fmt.Errorf("snapshot: format journal: %w", err)
	}
	s.j = j
	if err := writeSuperblock(store, &g); err != nil {
		_ = j.Close()
		return nil, err
	}
	s.start()
	return s, nil
}

// writeSuperblock writes g's superblock and flushes the store.
func writeSuperblock(store blockdev.Device, g *geometry) error {
	if _, err := store.WriteAt(alignedCopy(g.encode(), store.BlockSize()), 0); err != nil {
		return fmt.Errorf("snapshot: write superblock: %w", err)
	}
	if err := store.Flush(); err != nil {
		return fmt.Errorf("snapshot: format flush: %w", err)
	}
	return nil
}

func alignedCopy(b []byte, bs int) []byte {
	n := (len(b) + bs - 1) / bs * bs
	out := blockdev.AlignedBuffer(n)
	copy(out, b)
	return out
}

// openStore is Open once the devices are locked (lock.go).
func openStore(origin, store blockdev.Device, opts Options) (*Store, error) {
	if opts.Transient {
		return nil, fmt.Errorf("%w: a transient store cannot be reopened", ErrBadOptions)
	}
	buf := blockdev.AlignedBuffer(max(superblockSize, store.BlockSize()))
	if _, err := store.ReadAt(buf, 0); err != nil {
		return nil, fmt.Errorf("snapshot: read superblock: %w", err)
	}
	g, err := decodeSuperblock(buf)
	if err != nil {
		return nil, err
	}
	if g.transient {
		return nil, fmt.Errorf("%w: the store was formatted transient: it kept nothing to open", ErrBadOptions)
	}
	if g.originSize != origin.Size() || g.storeSize != store.Size() {
		return nil, fmt.Errorf("%w: superblock records origin %d and store %d bytes; devices have %d and %d",
			ErrCorrupt, g.originSize, g.storeSize, origin.Size(), store.Size())
	}
	opts.ChunkSize = int(g.chunkSize)
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	s := newStore(origin, store, opts, g)
	jdev, err := blockdev.Slice(store, g.journalOff, g.journalLen)
	if err != nil {
		return nil, fmt.Errorf("%w: journal region: %v", ErrCorrupt, err)
	}
	s.jdev = jdev
	s.replaying = true
	openJournal := journal.Open
	if opts.ReadOnly {
		openJournal = journal.OpenReadOnly
	}
	j, err := openJournal(jdev, s.journalOptions(), (*replayer)(s))
	s.replaying = false
	if errors.Is(err, journal.ErrCorrupt) {
		return nil, journalerr.Wrap(ErrCorrupt, "store", g.journalOff, g.journalLen, err)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot: open journal: %w", err)
	}
	s.j = j
	// The image loaded is measured; the records replayed on it count as
	// growth. Everything replayed is durable.
	s.metaMark.Store(&metaMark{bytes: emptyImage + j.Stats().CheckpointBytes})
	s.setDurable(j.LastSeq())
	s.afterReplay()
	s.start()
	return s, nil
}

func newStore(origin, store blockdev.Device, opts Options, g geometry) *Store {
	cs := int64(g.chunkSize)
	s := &Store{
		origin: origin, store: store, opts: opts, geo: g, cs: cs,
		chunks:   uint64((origin.Size() + cs - 1) / cs),
		bs:       max(origin.BlockSize(), store.BlockSize()),
		ix:       newIndex(),
		branches: map[uint32]*branch{},
		volumes:  map[uint64]*volume{},
		byName:   map[string]uint64{},
		byPoint:  map[point]uint64{},
		deletes:  map[uint64]*DeleteOp{},
		nextVol:  originVolumeID + 1,
		alloc:    newAllocator(g.dataChunks),
		gcKick:   make(chan struct{}, 1),
		ckptCh:   make(chan capture, 1),
	}
	s.preserved = make([]uint32, s.chunks)
	s.metaMark.Store(&metaMark{bytes: emptyImage})
	s.gcIdle = sync.NewCond(&s.mu)
	s.b0 = s.newBranch(0, 0, 0)
	s.branches[0] = s.b0
	s.nextBranch = 1
	created := g.formatted
	if created == 0 { // a store formatted before the superblock recorded it
		created = time.Now().UnixNano()
	}
	s.origVol = &volume{id: originVolumeID, name: originName, kind: KindOrigin, epoch: epochLive, created: created}
	s.b0.liveVol = originVolumeID
	s.volumes[originVolumeID] = s.origVol
	s.byName[originName] = originVolumeID
	s.bufs.New = func() any { b := blockdev.AlignedBuffer(int(cs)); return &b }
	s.scratch.New = func() any { return &scratch{} }
	s.initOriginBuf()
	return s
}

func (s *Store) journalOptions() journal.Options {
	return journal.Options{
		PreCommit:      s.store.Flush, // the data a record points to is durable before the record
		CheckpointAt:   s.opts.CheckpointAt,
		CheckpointSize: s.geo.journalLen / 4 / 4096 * 4096,
	}
}

// start launches the background goroutines.
func (s *Store) start() {
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.failCtx, s.failCancel = context.WithCancel(s.ctx)
	if s.opts.ReadOnly {
		return // nothing to commit, checkpoint or collect
	}
	s.wg.Add(1)
	go s.collector()
	if s.j != nil {
		s.wg.Add(2)
		go s.checkpointer()
		go s.committer()
	}
}

// Close stops the background work (a delete in progress resumes at the next
// Open), flushes both devices, commits what is pending and closes the
// journal. It does not close the origin or store devices. Closing a failed
// store still writes out the acknowledged origin writes whose copies are
// durable, and its error names the chunks of those it could not (their
// copy-on-write was never made durable, so the origin keeps its old data).
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return ErrClosed
	}
	defer s.releaseLocks()
	if s.opts.ReadOnly {
		return s.closeReadOnly()
	}
	s.cancel()
	s.mu.Lock()
	s.gcIdle.Broadcast()
	s.mu.Unlock()
	s.wg.Wait()
	var err error
	if p := s.failed.Load(); p != nil {
		err = fmt.Errorf("snapshot: close of a failed store: %w", *p)
		if lost := s.writeOutDurable(); lost != nil {
			err = fmt.Errorf("%w; %w", err, lost)
		}
	} else {
		// A clean shutdown leaves every completed write durable: the
		// buffered origin writes go out after their commit.
		if err = s.drainOrigin(context.Background()); err == nil {
			err = s.origin.Flush()
		}
		if err == nil {
			err = s.store.Flush()
		}
	}
	if s.j != nil {
		if err == nil && s.failed.Load() == nil {
			err = s.commit(context.Background())
		}
		if cerr := s.j.Close(); err == nil && cerr != nil && !errors.Is(cerr, journal.ErrClosed) {
			err = cerr
		}
	}
	s.closeVolumes()
	return err
}

// fail records a metadata failure: from now on every change returns it and
// the store must be reopened.
func (s *Store) fail(err error) error {
	if s.failed.CompareAndSwap(nil, &err) && s.failCancel != nil {
		s.failCancel()
	}
	return err
}

func (s *Store) usable() error {
	if s.closed.Load() {
		return ErrClosed
	}
	if p := s.failed.Load(); p != nil {
		return fmt.Errorf("snapshot: store failed earlier (reopen to recover): %w", *p)
	}
	return nil
}

// logLocked applies ops to memory and appends them as one record. Called
// with mu held, after makeLogRoom (called without it). It does no device
// I/O: past emergencyFill (writers raced past makeLogRoom) it hands the
// checkpointer a capture of the state so far, so that an Append that finds
// the log full, and waits for space under mu, is freed by a checkpoint
// that needs no lock of the store. Growth of the metadata image beyond
// what its checkpoint slot holds is refused with ErrNoSpace before
// anything changes (the collector's records, which free space, are not
// refused).
func (s *Store) logLocked(sc *scratch) (uint64, error) {
	if err := s.writable(); err != nil {
		return 0, err
	}
	if s.j == nil {
		return 0, s.applyOps(sc.ops, 0, false)
	}
	if !sc.reclaiming {
		if err := s.metaRoomLocked(s.opsCost(sc.ops)); err != nil {
			return 0, err
		}
	}
	if s.j.Stats().Fill > emergencyFill && s.j.LastSeq() > s.postedUpTo {
		s.postCaptureLocked()
	}
	seq := s.j.LastSeq() + 1
	if err := s.applyOps(sc.ops, seq, false); err != nil {
		return 0, s.fail(err)
	}
	sc.rec = encodeRecord(sc.rec, sc.ops)
	got, err := s.j.Append(s.failCtx, sc.rec)
	if err != nil {
		if uerr := s.usable(); uerr != nil {
			return 0, uerr // the store failed or closed while this waited for log room
		}
		return 0, s.fail(fmt.Errorf("snapshot: journal append: %w", err))
	}
	if got != seq {
		return 0, s.fail(fmt.Errorf("snapshot: journal append: sequence %d, expected %d", got, seq))
	}
	s.maybeCaptureLocked()
	return seq, nil
}

// emergencyFill is the journal fill past which an operation writes a
// checkpoint in the foreground (makeLogRoom) before it logs, rather than
// risk an Append blocked on a full log while it holds mu.
const emergencyFill = 0.75

// makeLogRoom is called before an operation takes mu to log, holding no
// lock of the store but its branch gate and stripes (lock order: they come
// before reclaim, which the checkpoint's release of freed chunks takes).
// When the journal is past emergencyFill (the background checkpoint fell
// behind) it writes a checkpoint in the foreground, outside mu: readers
// and other writers go on meanwhile. When the metadata bound nears the
// checkpoint slot with much growth not yet measured, it measures the
// image (CPU only), so that ErrNoSpace is not given for growth that a
// loose bound only imagined.
func (s *Store) makeLogRoom() error {
	if s.j == nil {
		return nil
	}
	if full, loose := s.needCheckpoint(); !full && !loose {
		return nil
	}
	s.fgMu.Lock()
	defer s.fgMu.Unlock()
	full, loose := s.needCheckpoint()
	if !full && !loose {
		return nil // another operation has just written one
	}
	if err := s.usable(); err != nil {
		return err
	}
	if !full {
		s.measures.Add(1)
		s.measureMeta()
		return nil
	}
	s.emergencies.Add(1)
	s.mu.Lock()
	c := s.captureLocked()
	s.mu.Unlock()
	if err := s.writeCheckpoint(s.ctx, c); err != nil {
		if s.ctx.Err() != nil {
			return err
		}
		return s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
	}
	s.releaseFreed(c.upTo)
	return nil
}

// needCheckpoint reports whether the journal is past emergencyFill, and
// whether the metadata bound is near the slot with enough growth since
// the last measure that a checkpoint (which measures it) may make room.
func (s *Store) needCheckpoint() (full, loose bool) {
	if s.j.Stats().Fill > emergencyFill {
		return true, false
	}
	limit := s.metaLimit()
	bound, unmeasured := s.metaBound()
	return false, bound > limit*7/8 && unmeasured > limit/32
}

// log takes mu and calls logLocked.
func (s *Store) log(sc *scratch) (uint64, error) {
	if err := s.makeLogRoom(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logLocked(sc)
}

// commit makes every record appended so far durable, then lets chunks they
// freed be reused.
func (s *Store) commit(ctx context.Context) error {
	if s.j == nil {
		if s.alloc.hasPending() {
			s.releaseFreed(^uint64(0))
		}
		return nil
	}
	target := s.j.LastSeq()
	if err := s.j.Commit(ctx); err != nil {
		if ctx.Err() != nil {
			return err
		}
		return s.fail(fmt.Errorf("snapshot: commit: %w", err))
	}
	s.setDurable(target)
	if s.alloc.hasPending() {
		s.releaseFreed(target)
	}
	return nil
}

// setDurable records that every record up to seq is durable.
func (s *Store) setDurable(seq uint64) {
	for {
		cur := s.durableSeq.Load()
		if seq <= cur || s.durableSeq.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// releaseFreed waits for reads in flight, then makes chunks freed by
// durable records reusable. Called with no lock of the store held but
// branch gates and stripes (reclaim comes after them, before mu).
func (s *Store) releaseFreed(seq uint64) {
	s.reclaim.Lock()
	s.alloc.durable(seq)
	s.reclaim.Unlock()
}

// flushStore makes every completed store write and record durable.
func (s *Store) flushStore() error {
	if err := s.usable(); err != nil {
		return err
	}
	if s.j != nil && s.j.LastSeq() > 0 {
		if err := s.commit(s.ctx); err != nil {
			return err
		}
	}
	return s.store.Flush()
}

// committer commits pending records every CommitInterval, and drains the
// origin buffer then and whenever it is half full. Its failures are kept:
// a failed commit fails the store, a failed origin write is reported by the
// next Flush.
func (s *Store) committer() {
	defer s.wg.Done()
	if s.opts.CommitInterval < 0 {
		return
	}
	t := time.NewTicker(s.opts.CommitInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		case <-s.ob.kick: // nil (never ready) with the buffer off
		}
		if s.usable() != nil {
			continue
		}
		if s.ob.n.Load() > 0 {
			_ = s.drainOrigin(s.ctx)
		} else {
			_ = s.commit(s.ctx)
		}
	}
}

func (s *Store) getBuf() *[]byte  { return s.bufs.Get().(*[]byte) }
func (s *Store) putBuf(b *[]byte) { s.bufs.Put(b) }

func (s *Store) getScratch() *scratch {
	sc := s.scratch.Get().(*scratch)
	sc.ops, sc.cow, sc.reclaiming = sc.ops[:0], sc.cow[:0], false
	return sc
}

func (s *Store) putScratch(sc *scratch) { s.scratch.Put(sc) }

// chunkLen is the number of bytes of chunk c within the origin.
func (s *Store) chunkLen(c uint64) int64 { return min(s.cs, s.geo.originSize-int64(c)*s.cs) }

// storeOff is the store offset of data chunk loc.
func (s *Store) storeOff(loc uint64) int64 { return s.geo.dataOff + int64(loc)*s.cs }
