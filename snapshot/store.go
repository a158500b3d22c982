// Package snapshot is the shared snapshot store: one origin device holding
// the live data in place, and one store device holding every snapshot and
// writable clone of it, with unlimited snapshots, clones of clones to any
// depth, metadata-only background delete and diffs between snapshots. It is
// also a pool of thin volumes (docs/pool.md): blank volumes (CreateVolume)
// and imported ones (Import), each with its own size (Resize) and a stable
// UUID, in a store that may have no origin at all (Format and Open with a
// nil origin).
//
// Data model (docs/design.md, "The shared snapshot store"). Every writable volume is a branch: the
// origin is branch 0, a clone is a branch whose parent is a (branch,
// snapshot) point, a blank volume is a root branch with no parent (what
// nothing maps reads as zeros, not as the origin). A snapshot of a branch is a number (an epoch) in that
// branch's increasing sequence. One ordered index keyed (branch, chunk,
// epoch) maps to store chunks: entry (b, c, e) serves the snapshots of b
// numbered in (previous entry's epoch, e]; a clone's live chunks use the
// largest epoch. So an origin write copies a chunk at most once however many
// snapshots exist, and any read is one index seek per level of clone depth
// at most, with a per-branch summary that lets levels without entries be
// skipped without a seek.
//
// API conventions. Operations on a volume's data, or that derive one
// volume from another, take an open *Volume handle: CreateSnapshot,
// CreateClone, Rollback, Diff, ExportDiff, Mappings. Operations on the
// catalogue take names: OpenVolume, CreateVolume, Import, Resize, Delete
// and DeleteWith, Dependants, Rename, Protect and Unprotect, Stat (a name works without opening the
// volume, and a hidden volume has no name and cannot be opened). Every
// size and offset is in bytes and every count an int64: Options, Stats,
// VolumeStat, VolumeInfo, DeleteProgress, Mapping (a Volume's BlockSize is
// an int because blockdev.Device says so).
//
// Crash safety: the index and the data space map live in a paged,
// copy-on-write B+tree in the store's metadata region (package
// snapshot/internal/meta, docs/metadata.md), behind a bounded page cache
// (Options.MetadataCache). Every change is also a journal record (package
// journal): a group commit is one journal append and flush. In the
// background, and at Close, a tree commit writes the changed pages and
// switches the tree's superblock, which records the last journal record it
// covers; the journal is then trimmed to it, and a checkpoint of the small
// state (branches and volumes, not the index) is written to the journal.
// An origin write that needs a copy writes the copy to the store and
// appends the record; its data waits in memory (the origin buffer) until a
// commit (store flush, then the record) is durable, and only then reaches
// the origin device.
//
// What Open costs: reading the tree's superblock and space maps (one 4 KiB
// page per 32,512 data chunks or metadata pages, 32 reads at a time), the checkpoint image
// (the branch and volume tables, with each branch's chunk-group bits that
// let reads skip clone levels), and replaying the journal records after
// the last tree commit (at most about 65,536 records or index changes,
// whose changes wrote at most about 16,384 leaves, and the journal's
// fill; none after a clean Close), sorted by key. No
// walk of the tree: each origin chunk's preserved epoch is looked up on
// its first write after Open (preserve.go).
//
// Memory is bounded by the cache, not by the history or the volumes'
// sizes: Options.MetadataCache (default 64 MiB: an eighth of it caches
// the origin chunks' preserved epochs, at most an eighth the data space
// map's partly used bitmap pages (1 bit per data chunk where every page
// is partly used, 32 MiB per TiB of store at 4 KiB chunks and 2 MiB at 64
// KiB; past its eighth, pages are paged out and read back on use), the
// metadata map 1 bit per metadata page, and decoded pages the rest, at
// least a quarter), the origin
// buffer (Options.OriginBuffer, default 32 MiB), a tree commit's write
// buffer (256 KiB), the Go allocator's free slots between collections
// (docs/metadata.md section 22), at most 8 KiB per branch for its chunk-group bits, and about 24 bytes per snapshot
// ever taken of the origin for its space counters.
// docs/metadata.md section 18 has the measurements and how to size the
// cache.
package snapshot

import (
	"cmp"
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
	"github.com/blocksnap/blocksnap/snapshot/internal/lockstat"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
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
	// ErrOldFormat: the store was written by an older format version; the
	// error names both versions. Migrate (blocksnap migrate) converts it.
	ErrOldFormat = errors.New("snapshot: store format too old")
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
	// region is full fails the write with ErrNoSpace under either policy
	// (deleting snapshots frees that room only once the collector has
	// run).
	NoSpaceInvalidate
)

// Options configures Format and Open. The zero value is a good default.
type Options struct {
	// ChunkSize is the copy-on-write unit in bytes: a power of two from
	// 4 KiB to 1 MiB; 0 means 64 KiB. Format only (Open reads it).
	ChunkSize int64
	// TakeOver opens a store whose owner record names a holder that may
	// still run (another host, or a live pid of this host on a store
	// device without flock): the caller has made sure it is gone. A
	// holder that is certainly gone (this host and no such process, or
	// the flock it held is free) is taken over without it (owner.go).
	// It also opens a store whose identity region is unreadable (both
	// copies bad), writing a new one (a read-only open only reads past
	// it) with the origin fingerprinted as it is.
	TakeOver bool
	// JournalSize is the journal region in bytes (checkpoint slots and
	// log); 0 means 1/32 of the store, at least 1 MiB and at most 2 GiB.
	// Format only.
	JournalSize int64
	// MetadataBytes is the metadata region in bytes (the paged index and
	// space maps); 0 means 1% of the store, at least 64 MiB. Either is
	// clamped to an eighth of what follows the journal (but 1 MiB, the
	// least it may be), and rounded down to 4 KiB. Format only. See docs/metadata.md for the sizes: a
	// random chunk version takes about 11 bytes, a sequential one about 1.
	MetadataBytes int64
	// MetadataCache bounds, in bytes, the metadata the store keeps in
	// memory: the origin chunks' preserved epochs (an eighth, at least 96
	// KiB: 12-16 bytes per chunk, about 390,000 chunks by default; a chunk
	// not in it costs one lookup at its next write), the data space map
	// (1 bit per data chunk where its pages are partly used, 32 MiB per
	// TiB of store at 4 KiB chunks, up to an eighth: past it bitmap pages
	// are read back on use, Stats.SpaceMapReads), the metadata map (1 bit
	// per metadata page), and decoded metadata pages (the rest, at least a
	// quarter); 0 means 64 MiB. To keep every lookup
	// at one page read at most it should hold the tree's branch levels,
	// about 0.2 bytes per random chunk version; about 66 bytes per version
	// of the chunks a workload touches between tree commits (a decoded
	// leaf run in each of the two trees) make those writes cheap, and about 128 bytes per origin chunk a workload keeps
	// rewriting spare those writes the lookup.
	MetadataCache int64
	// LowMetadata, if set, is called (without locks held) when the free
	// metadata space drops below an eighth of the region plus the part
	// kept for deletes and commits (1% and at least 256 KiB, plus 128
	// KiB): free and total bytes, once per crossing. Past the point where a change could not be committed,
	// changes fail with ErrNoSpace; deletes still work and free space.
	LowMetadata func(free, total int64)
	// LowData, if set, is called (without locks held, on a goroutine of
	// the store) when the free data space drops below LowDataThreshold
	// bytes (0: an eighth of the data region): free and total bytes. It
	// fires once per crossing, as dm-thin's low-water mark does, so a
	// manager can extend the store device, reopen, and Grow.
	LowData          func(free, total int64)
	LowDataThreshold int64
	// CommitInterval is how often pending metadata is committed in the
	// background; 0 means one second, negative disables it (commits then
	// happen on Flush, FUA and snapshot operations only). The metadata
	// tree is committed every five intervals, every 65,536 records or
	// index changes, once the changes since the last commit wrote 8,192
	// leaves, when the journal passes CheckpointAt, and at Close.
	CommitInterval time.Duration
	// Transient keeps the index in memory only, with no journal: nothing
	// survives Close (a short-lived backup snapshot). Format writes a
	// superblock that says so, and a later Open of the store device fails
	// with ErrBadOptions (it never finds an earlier store there). Within
	// its session it works as any store: GrowMetadata, CreateVolume and
	// Resize included.
	Transient bool
	// NoSpace is the origin's behaviour when the store is full.
	NoSpace NoSpacePolicy
	// CheckpointAt is the journal fill fraction that starts a background
	// checkpoint (a tree commit): from 0.05 to 0.7; 0 means 0.5. Other values are refused
	// with ErrBadOptions: past 0.75 of the journal an operation must write
	// a checkpoint itself, in the foreground, before it may log (it never
	// waits for one under the store's lock), so a background checkpoint
	// that starts later than 0.7 would leave every checkpoint to the
	// foreground.
	CheckpointAt float64
	// ReadOnly opens the store for inspection (Open only). The journal
	// records since the last tree commit (none after a clean Close) are
	// applied to the index in memory, where they stay: after a crash that
	// costs up to a decoded leaf per record replayed. Nothing is
	// written to either device, not even the journal's new epoch or the
	// end of an interrupted delete, so the devices may be blockdev.ReadOnly
	// views. Volumes read, List, Stat, Stats, Diff, ExportDiff and Check
	// work; every change (writes, discards, snapshots, clones, deletes,
	// renames, rollbacks, checkpoints) fails with ErrReadOnly. Beside a
	// live writer (a store device without a lock; with one, the Open is
	// refused with ErrLiveWriter) metadata a writer replaced since the
	// Open gives ErrStoreChanged, never ErrCorrupt: reopen (livero.go).
	ReadOnly bool
	// storeFlock: the store device holds a real flock (lockDevices set
	// it), which an owner record of this Open records.
	storeFlock bool
	// syncWriteBack makes the metadata layer write back dirty pages in
	// the writer's calls (meta.Options.SyncWriteBack): the crash torture
	// uses it so that a seed replays the same device calls.
	syncWriteBack bool
	// noReadAhead: Open's replay applies the changes without reading
	// their pages ahead (replay.go); tests compare the two.
	noReadAhead bool
	// treeLeaves, if set, replaces treeCommitLeaves (tests: a small
	// tree gets tree commits by touched leaves).
	treeLeaves int
	// MaxVolumeSize bounds, in bytes, the size of every volume of the
	// store (CreateVolume, Resize, Import): it is the extent of the index's
	// chunk space, whose per-branch summaries stay the same size whatever
	// it is, but grow coarser (and reads of deep clone chains slower) the
	// larger it is. 0 means 16 TiB, or the origin's size if larger; it is
	// rounded up to the chunk size. Format only (the superblock records it).
	MaxVolumeSize int64
	// OriginBuffer bounds, in bytes, the origin writes held in memory after
	// their copy-on-write, until a commit makes the copy durable and lets
	// them reach the origin device (rounded down to whole chunks, at least
	// one); 0 means 32 MiB, negative turns buffering off (each such write
	// then waits for its commit). Unused in transient mode. The memory is
	// taken as copies need it and given back once the origin has made no
	// copy for five commit intervals (with the background committer on).
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
	maxChunks     uint64 // the chunk space: chunks of the largest volume (geometry.volumeBound)
	bs            int    // volume block size
	j             *journal.Journal
	jdev          *blockdev.SliceDevice
	// m is the metadata region: the index (through ix) and the data space
	// map. Its own locks come after every lock of the store.
	m    *meta.Meta
	mdev *blockdev.SliceDevice
	// treeSeq is the last journal record the tree's last durable commit
	// covers, as Open found it: replay applies only the volume and branch
	// changes of records up to it (their index changes are in the tree).
	treeSeq uint64
	// migrating: Migrate is loading a format version 1 store's journal
	// into this one (its checkpoint image holds the index).
	migrating bool
	// rebuild: the checkpoint image Open loaded predates the chunk-group
	// summaries (version 2), so Open rebuilds the summaries by a walk.
	rebuild bool
	// replayOps is Replay's reusable record buffer; deferred holds the
	// replayed index changes not applied yet (replay.go).
	replayOps []op
	deferred  []deferredOp
	// replayKeys and replayKey are the read-ahead keys of the deferred
	// changes (replay.go), Open's alone like deferred.
	replayKeys []meta.Key
	replayKey  [2]meta.Key
	// replayWindows counts the read-ahead windows Open's replay applied.
	replayWindows int

	// mu guards the index, the branch and volume tables and the collector's
	// queue. It is never held across device I/O, nor while waiting for
	// any, but by an Append that finds the log full despite makeLogRoom
	// (then a checkpoint that needs no lock frees it). Lock order: branch
	// gate, then clone stripe, then origin stripe, then fgMu, then
	// reclaim, then mu, then allocator.mu, then the meta layer's locks;
	// the origin buffer's drainMu is never held with mu. id.mu
	// (identity.go) comes after the origin stripes and is a leaf. The index (ix)
	// is changed only with mu held exclusively, so a tree commit frozen
	// under mu covers whole journal records.
	mu        lockstat.RWMutex // a sync.RWMutex that keeps its longest hold and wait (LockStats)
	ix        pagedIndex
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
	// pres caches origin chunks' preserved epochs: the greatest epoch for
	// which chunk c has been copied (0: never). A write to c needs a copy
	// iff the newest held epoch of branch 0 is greater. Bounded by a share
	// of Options.MetadataCache; guarded by the origin stripe of c and mu
	// (preserve.go says how).
	pres presCache
	// ctr: the space counters of the origin and its snapshots
	// (counters.go). Guarded by mu.
	ctr counters
	// ctrRebuilt: Open found ctr stale and rebuilt it by a walk (set
	// before the store is shared; tests read it).
	ctrRebuilt bool

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
	// capOut is set while a capture (a frozen tree commit) is made and
	// not yet written: at most one is, so a freeze never waits, under mu,
	// for another commit's I/O. capDone, on mu, is broadcast when it is
	// cleared. capFreed is the outstanding capture's freed channel
	// (capture.freed). All three guarded by mu.
	capOut   bool
	capDone  *sync.Cond
	capFreed chan struct{}
	// volRecs is the volume records the last capture made, which the
	// next reuses while no record changed a volume since, and patches
	// (a copy) for the volumes named in volChanged otherwise (applyOp
	// notes them): a walk and a sort of every volume cost milliseconds
	// under mu with 10,000 snapshots, at every tree commit, and a record
	// changes one volume. volAll: the next capture makes them all again
	// (after a checkpoint load, or past maxVolChanged notes). Captures and Check only read
	// the records. All guarded by mu.
	volRecs    []volRec
	volChanged []uint64
	volAll     bool
	// capTaken holds the freed channels of the captures that a writer
	// waiting for log space ended (logRoomLocked) before the capture's
	// own writer ran its endCapture, which then still waits for mu; empty
	// when none. There may be several: a foreground tree commit waits
	// only for capOut, so it can capture again while the checkpointer
	// still waits to end a capture taken over, and a writer may take that
	// one over too. While any is set nothing is posted to the
	// checkpointer, which may be one of those writers (a capture left in
	// its channel would never be written while the poster holds mu).
	// Each endCapture removes only its own. Guarded by mu.
	capTaken []chan struct{}
	// lastTreeSeq is the journal record the last tree commit frozen
	// covers; guarded by mu.
	lastTreeSeq uint64
	// treeChanges counts the index changes logged since then (guarded by
	// mu): a record may hold many (a sequential write's copies), and
	// Open replays each one.
	treeChanges int
	// fgMu serialises foreground checkpoints (makeLogRoom), so that writers
	// that find the journal full write one, not one each. Taken with no
	// lock of the store held but branch gates and stripes; mu and reclaim
	// are taken under it.
	fgMu sync.Mutex
	// emergencies counts foreground checkpoints written because the
	// journal passed emergencyFill (tests report them).
	emergencies atomic.Int64
	// leafWaits counts writers that waited for a tree commit because the
	// changes not yet in a durable one touched 2*treeCommitLeaves leaves,
	// and leafCommits those that wrote one for that reason (bindTail).
	leafWaits, leafCommits atomic.Int64
	// lowDataFired: the LowData warning fired and the free space has not
	// risen above the threshold since; lowDataKick wakes the notifier.
	lowDataFired atomic.Bool
	lowDataKick  chan struct{}
	// durableSeq is the last record known durable (a commit or a
	// checkpoint covered it): buffered origin writes preserved by records
	// up to it may reach the origin even after the store failed.
	durableSeq atomic.Uint64

	ob originBuf // origin writes waiting for their copy's commit

	locks    deviceLocks // the devices' locks, released by Close (lock.go)
	originRO bool        // the origin device refuses writes (lock.go); set before the store is handed out

	// id is the owner record and the origin's fingerprint (identity.go,
	// owner.go). claimed: this Store wrote its owner record, which
	// Close clears; ownerSeen: the record a read-only Open found. Both
	// are set by Format or Open before the store is handed out.
	id        ident
	claimed   bool
	ownerSeen ownerRecord
}

// scratch is per-operation reusable memory for the write paths.
type scratch struct {
	ops []op
	rec []byte
	cow []cowChunk
	// reclaiming: the collector's record, which frees space and is not
	// refused for the metadata bound.
	reclaiming bool
	// pins: the index nodes lockForOps pinned for ops, until unlockOps
	// (pagedindex.go).
	pins meta.Pins
	// frees: the store chunks ops free, for readMapAhead.
	frees []uint64
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
	judging.Lock() // until the claim (owner.go)
	defer judging.Unlock()
	if err := refuseFormatOver(store, opts); err != nil {
		return nil, err
	}
	s, err := formatRegions(origin, store, opts)
	if err != nil {
		return nil, err
	}
	if err := s.formatIdentity(true); err != nil {
		s.abort()
		return nil, err
	}
	if err := writeSuperblock(store, &s.geo); err != nil {
		s.abort()
		return nil, err
	}
	s.start()
	return s, nil
}

// minMetaBytes is the smallest metadata region.
const minMetaBytes = 1 << 20

// layout computes a new store's geometry: superblock, journal, metadata
// region, data.
func layout(origin, store blockdev.Device, opts *Options) (geometry, error) {
	cs := int64(opts.ChunkSize)
	g := geometry{chunkSize: uint32(cs), originSize: origin.Size(), storeSize: store.Size(), journalOff: superblockSize,
		version: superblockVersion}
	if !opts.Transient {
		g.idOff, g.idLen = superblockSize, identityLen
		g.journalOff += identityLen
		jl := opts.JournalSize
		if jl == 0 {
			jl = min(max(store.Size()/32, 1<<20), 2<<30)
		}
		g.journalLen = (jl + 4095) / 4096 * 4096
	}
	g.metaOff = g.journalOff + g.journalLen
	ml := opts.MetadataBytes
	if ml == 0 {
		ml = max(store.Size()/100, 64<<20)
	}
	ml = min(ml, max((store.Size()-g.metaOff)/8, minMetaBytes))
	g.metaLen = max(ml/4096*4096, 0)
	g.dataOff = (g.metaOff + g.metaLen + cs - 1) / cs * cs
	if err := poolLayout(&g, origin, opts); err != nil {
		return g, err
	}
	if g.metaLen < minMetaBytes || g.dataOff >= store.Size() {
		return g, fmt.Errorf("%w: store of %d bytes has no room for %d bytes of metadata (at least %d) and data after %d bytes of journal",
			ErrBadOptions, store.Size(), g.metaLen, minMetaBytes, g.journalLen)
	}
	g.dataChunks = uint64((store.Size() - g.dataOff) / cs)
	if g.dataChunks == 0 {
		return g, fmt.Errorf("%w: store of %d bytes holds no data chunk", ErrBadOptions, store.Size())
	}
	_, _ = rand.Read(g.uuid[:])
	g.formatted = time.Now().UnixNano()
	g.transient = opts.Transient
	return g, nil
}

// formatRegions formats the journal and the metadata region and returns
// the store, not started, with its superblock not yet written (Migrate
// writes it last).
func formatRegions(origin, store blockdev.Device, opts Options) (*Store, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	if opts.ReadOnly {
		return nil, fmt.Errorf("%w: Format of a read-only store", ErrBadOptions)
	}
	g, err := layout(origin, store, &opts)
	if err != nil {
		return nil, err
	}
	s := newStore(origin, store, opts, g)
	if err := s.openMeta(true); err != nil {
		return nil, err
	}
	if opts.Transient {
		return s, nil
	}
	jdev, err := blockdev.Slice(store, g.journalOff, g.journalLen)
	if err != nil {
		s.abort()
		return nil, fmt.Errorf("snapshot: journal region: %w", err)
	}
	s.jdev = jdev
	j, err := journal.Format(jdev, s.journalOptions())
	if err != nil {
		s.abort()
		return nil, fmt.Errorf("snapshot: format journal: %w", err)
	}
	s.j = j
	return s, nil
}

// openMeta formats or opens the metadata region.
func (s *Store) openMeta(format bool) error {
	mdev, err := blockdev.Slice(s.store, s.geo.metaOff, s.geo.metaLen)
	if err != nil {
		return fmt.Errorf("%w: metadata region: %v", ErrCorrupt, err)
	}
	s.mdev = mdev
	mo := meta.Options{Pages: uint64(s.geo.metaLen) / meta.PageSize, DataChunks: s.geo.dataChunks,
		CacheBytes: int(nodeCacheBytes(s.opts.MetadataCache, s.geo.dataChunks, uint64(s.geo.metaLen)/meta.PageSize)),
		MapBytes:   int(dataMapBytes(s.opts.MetadataCache, s.geo.dataChunks)), SyncWriteBack: s.opts.syncWriteBack,
		Outer: s.store, DataOff: s.geo.dataOff, ChunkBytes: s.cs} // the region grows into data chunks (grow.go)
	if fn := s.opts.LowMetadata; fn != nil {
		// An eighth of the region above what changes may not use: the
		// layer's delete reserve (1%, at least 64 pages) and room for a
		// commit.
		mo.LowSpaceThreshold = mo.Pages/8 + max(64, mo.Pages/100) + 32
		mo.LowSpace = func(free, total uint64) { fn(int64(free)*meta.PageSize, int64(total)*meta.PageSize) }
	}
	var m *meta.Meta
	switch {
	case format:
		m, err = meta.Format(mdev, mo)
	case s.opts.ReadOnly:
		m, err = meta.OpenOverlay(mdev, mo)
	default:
		m, err = meta.Open(mdev, mo)
	}
	if err != nil {
		return metaErr("metadata region", err)
	}
	s.m = m
	if !format {
		if err := s.adoptDataChunks(m.Space().Chunks); err != nil {
			_ = m.Close()
			return err
		}
	}
	s.ix = pagedIndex{m: m}
	s.alloc = newAllocator(m)
	return nil
}

// abort releases what formatRegions or Open opened, for a store that will
// not be returned.
func (s *Store) abort() {
	_ = s.releaseOwner()
	if s.j != nil {
		_ = s.j.Close()
	}
	if s.m != nil {
		_ = s.m.Close()
	}
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

// readSuperblock reads and decodes the store's superblock (either
// version) and checks it against the devices.
func readSuperblock(origin, store blockdev.Device) (geometry, error) {
	buf := blockdev.AlignedBuffer(max(superblockSize, store.BlockSize()))
	if _, err := store.ReadAt(buf, 0); err != nil {
		return geometry{}, fmt.Errorf("snapshot: read superblock: %w", err)
	}
	g, err := decodeSuperblock(buf)
	if err != nil {
		return g, err
	}
	if g.transient {
		return g, fmt.Errorf("%w: the store was formatted transient: it kept nothing to open", ErrBadOptions)
	}
	if err := checkOriginKind(&g, origin); err != nil {
		return g, err
	}
	if g.originSize != origin.Size() {
		e := &OriginError{Size: g.originSize, GotSize: origin.Size()}
		if g.idLen != 0 {
			if st, err := readIdentity(store, &g); err == nil {
				e.Fingerprint = st.fingerprint()
			}
		}
		return g, e
	}
	// A larger store device is a grown one (Grow uses the new space).
	if g.storeSize > store.Size() {
		return g, fmt.Errorf("%w: superblock records a store of %d bytes; the device has %d",
			ErrCorrupt, g.storeSize, store.Size())
	}
	return g, nil
}

// openStore is Open once the devices are locked (lock.go): it opens the
// metadata region at its last tree commit and replays the journal records
// after it.
func openStore(origin, store blockdev.Device, opts Options) (*Store, error) {
	if opts.Transient {
		return nil, fmt.Errorf("%w: a transient store cannot be reopened", ErrBadOptions)
	}
	g, err := readSuperblock(origin, store)
	if err != nil {
		return nil, err
	}
	if g.version != superblockVersion {
		return nil, fmt.Errorf("%w: the store is format version %d, this build reads version %d: convert it with `blocksnap migrate` (snapshot.Migrate)",
			ErrOldFormat, g.version, superblockVersion)
	}
	opts.ChunkSize = int64(g.chunkSize)
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	s := newStore(origin, store, opts, g)
	if err := s.openIdentity(); err != nil {
		s.abort()
		return nil, err
	}
	if err := s.openMeta(false); err != nil {
		s.abort()
		return nil, err
	}
	s.treeSeq = s.m.User()
	s.forgetPreserved() // looked up in the tree on first use (preserve.go)
	if err := s.openJournal(); err != nil {
		s.abort()
		return nil, err
	}
	if s.rebuild {
		if err := s.rebuildSummaries(); err != nil {
			s.abort()
			return nil, err
		}
	}
	if err := s.settleCounters(); err != nil {
		s.abort()
		return nil, err
	}
	if err := s.afterReplay(); err != nil {
		s.abort()
		return nil, err
	}
	s.start()
	s.dropInterruptedImports()
	return s, nil
}

// openJournal opens the journal and replays it: its checkpoint (the small
// state) and the records after it, of which those up to treeSeq change
// only the small state (the tree holds their index changes).
func (s *Store) openJournal() error {
	g := s.geo
	jdev, err := blockdev.Slice(s.store, g.journalOff, g.journalLen)
	if err != nil {
		return fmt.Errorf("%w: journal region: %v", ErrCorrupt, err)
	}
	s.jdev = jdev
	s.replaying = true
	// The replayed records were accepted once: none may be refused for
	// the delete reserve now (Open replays them in one transaction, which
	// needs no more pages than they took).
	s.ix.reserve = true
	openJournal := journal.Open
	if s.opts.ReadOnly {
		openJournal = journal.OpenReadOnly
	}
	j, err := openJournal(jdev, s.journalOptions(), (*replayer)(s))
	if err == nil {
		if err = s.flushDeferred(); err != nil {
			_ = j.Close()
			s.replaying, s.ix.reserve = false, false
			return err
		}
		s.deferred, s.replayOps, s.replayKeys = nil, nil, nil // Open's alone
	}
	s.replaying, s.ix.reserve = false, false
	if errors.Is(err, journal.ErrCorrupt) {
		return journalerr.Wrap(ErrCorrupt, "store", g.journalOff, g.journalLen, err)
	}
	if err != nil {
		return fmt.Errorf("snapshot: open journal: %w", err)
	}
	s.j = j
	if j.LastSeq() < s.treeSeq {
		_ = j.Close()
		return fmt.Errorf("%w: the metadata tree covers journal record %d, the journal ends at %d", ErrCorrupt, s.treeSeq, j.LastSeq())
	}
	s.setDurable(j.LastSeq()) // everything replayed is durable
	return nil
}

func newStore(origin, store blockdev.Device, opts Options, g geometry) *Store {
	cs := int64(g.chunkSize)
	s := &Store{
		origin: origin, store: store, opts: opts, geo: g, cs: cs,
		chunks:      uint64((origin.Size() + cs - 1) / cs),
		maxChunks:   uint64((g.volumeBound() + cs - 1) / cs),
		bs:          max(origin.BlockSize(), store.BlockSize()),
		branches:    map[uint32]*branch{},
		volumes:     map[uint64]*volume{},
		byName:      map[string]uint64{},
		byPoint:     map[point]uint64{},
		deletes:     map[uint64]*DeleteOp{},
		nextVol:     originVolumeID + 1,
		gcKick:      make(chan struct{}, 1),
		lowDataKick: make(chan struct{}, 1),
		ckptCh:      make(chan capture, 1),
	}
	s.pres.maxSlots = presSlotsFor(presBudget(opts.MetadataCache))
	s.pres.zero.Store(true) // Format's: no chunk copied (Open forgets it)
	s.gcIdle = sync.NewCond(&s.mu)
	s.capDone = sync.NewCond(&s.mu)
	s.b0 = s.newBranch(0, 0, 0)
	s.branches[0] = s.b0
	s.nextBranch = 1
	s.countFormat()
	created := g.formatted
	if created == 0 { // a store formatted before the superblock recorded it
		created = time.Now().UnixNano()
	}
	s.origVol = &volume{id: originVolumeID, name: originName, kind: KindOrigin, epoch: epochLive, created: created}
	s.origVol.size.Store(g.originSize)
	s.b0.liveVol = originVolumeID
	s.volumes[originVolumeID] = s.origVol
	if !g.noOrigin {
		s.byName[originName] = originVolumeID
	}
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
	if s.opts.LowData != nil {
		s.wg.Add(1)
		go s.lowDataNotifier()
	}
	if s.j != nil {
		s.wg.Add(2)
		go s.checkpointer()
		go s.committer()
	}
}

// Close stops the background work (a delete in progress resumes at the next
// Open), flushes both devices, commits what is pending, commits the
// metadata tree (so that the next Open replays nothing) and closes the
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
	// Taking mu after the cancel is also a barrier: a capture is posted
	// under mu and only before the cancel (postCaptureLocked), so once mu
	// is ours any capture is in the checkpointer's channel or taken. The
	// checkpointer may already have exited without it; write it here, or
	// a tree commit waiting for it (the collector's) would keep wg.Wait
	// waiting for ever. Cancel is not done under mu: a writer may hold mu
	// while its journal Append waits on the canceled context.
	s.mu.Lock()
	s.gcIdle.Broadcast()
	s.mu.Unlock()
	s.dropCapture()
	s.wg.Wait()
	var gens [maxSamples]uint64 // taken just before the origin's Flush
	var err error
	if p := s.failed.Load(); p != nil {
		err = fmt.Errorf("snapshot: close of a failed store: %w", *p)
		if lost := s.writeOutDurable(); lost != nil {
			err = fmt.Errorf("%w; %w", err, lost)
		}
	} else {
		// A clean shutdown leaves every completed write durable: the
		// buffered origin writes go out after their commit.
		if err = s.drainOrigin(context.Background(), false); err == nil {
			gens = s.sampleGens()
			err = s.origin.Flush()
		}
		if err == nil {
			err = s.store.Flush()
		}
	}
	s.dropCapture() // a capture the stopped checkpointer never took
	if err == nil && s.failed.Load() == nil {
		err = s.treeCommit(context.Background())
	}
	if p := s.failed.Load(); err == nil && p != nil {
		err = *p
	}
	if s.j != nil {
		if cerr := s.j.Close(); err == nil && cerr != nil && !errors.Is(cerr, journal.ErrClosed) {
			err = cerr
		}
	}
	if cerr := s.m.Close(); err == nil && cerr != nil && !errors.Is(cerr, meta.ErrClosed) {
		err = cerr
	}
	if err == nil {
		// The origin is flushed: its samples' contents are durable.
		err = s.settleSamples(&gens)
	}
	if rerr := s.releaseOwner(); err == nil && rerr != nil {
		err = rerr
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

// logLocked applies ops to the index and appends them as one record.
// Called with mu held, after makeLogRoom (called without it). It does no
// device I/O but the metadata layer's page reads and write-back: past
// emergencyFill (writers raced past makeLogRoom) it freezes a tree commit
// and hands it to the checkpointer, so that an Append that finds the log
// full, and waits for space under mu, is freed by a checkpoint that needs
// no lock of the store. A record the metadata region may not have room
// for is refused with ErrNoSpace before anything changes (the collector's
// records, which free space, may use the layer's delete reserve).
func (s *Store) logLocked(sc *scratch) (uint64, error) {
	if err := s.writable(); err != nil {
		return 0, err
	}
	n, adds := indexChanges(sc.ops)
	// Records that only remove entries (and the collector's) may use the
	// layer's delete reserve, so deletes work on a full region: their
	// puts too (the collector moves entries), or a put would be refused
	// half way through the record and fail the store.
	s.ix.reserve = sc.reclaiming || !adds
	defer func() { s.ix.reserve = false }()
	if n > 0 {
		if err := s.m.Room(n, s.ix.reserve); err != nil {
			if errors.Is(err, meta.ErrNoSpace) {
				return 0, metaRoomError{metaErr("metadata region", err)}
			}
			return 0, s.fail(metaErr("metadata region", err))
		}
	}
	if s.j == nil {
		if err := s.applyOps(sc.ops, 0, false); err != nil {
			return 0, s.fail(err)
		}
		return 0, nil
	}
	if s.j.Stats().Fill > emergencyFill && !s.capOut {
		s.postCaptureLocked()
	}
	// Sized before applyOps (which may fill in the ops), encoded again
	// after it: the buffer is reused, so this allocates nothing.
	sc.rec = encodeRecord(sc.rec, sc.ops)
	if err := s.logRoomLocked(len(sc.rec)); err != nil {
		return 0, err
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
	s.treeChanges += n
	s.maybeCaptureLocked()
	return seq, nil
}

// logRoomLocked makes sure that an Append of a record of n bytes, which
// waits for log space holding mu, is freed by a checkpoint that needs no
// lock of the store: one of a capture covering every record logged so
// far. A capture outstanding (the checkpointer, or a foreground tree
// commit, still writing it) covers only the records up to its upTo; the
// log may still be full of those logged since once it is written, and
// its endCapture waits for mu. So wait, holding mu, until it has freed
// its part of the log (it needs no lock of the store to get there), end
// it here, and capture again. Called with mu held, before any change.
func (s *Store) logRoomLocked(n int) error {
	for !s.j.Room(n) {
		if !s.capOut && len(s.capTaken) == 0 {
			s.postCaptureLocked() // the Append waits for this one
			return nil
		}
		if !s.capOut {
			// A capture ended here has a writer still waiting for mu
			// (possibly the checkpointer, which would then never take a
			// posted capture): write the next one here, holding mu.
			if err := s.writeCaptureLocked(); err != nil {
				return err
			}
			continue
		}
		select {
		case <-s.capFreed:
		case <-s.failCtx.Done():
			if err := s.usable(); err != nil {
				return err
			}
			return ErrClosed
		}
		if err := s.usable(); err != nil {
			return err // the capture failed, and failed the store
		}
		s.capOut = false // its endCapture, waiting for mu, sees the capture ended
		s.capTaken = append(s.capTaken, s.capFreed)
		s.capDone.Broadcast()
	}
	return nil
}

// indexChanges is the number of index keys ops put or delete, and
// whether any is put.
func indexChanges(ops []op) (n int, adds bool) {
	for i := range ops {
		switch ops[i].kind {
		case opPut:
			n, adds = n+int(ops[i].n), true
		case opDel:
			n += int(ops[i].n)
		case opMove:
			n, adds = n+2, true
		}
	}
	return n, adds
}

// emergencyFill is the journal fill past which an operation writes a
// checkpoint in the foreground (makeLogRoom) before it logs, rather than
// risk an Append blocked on a full log while it holds mu.
const emergencyFill = 0.75

// makeLogRoom is called before an operation takes mu to log, holding no
// lock of the store but its branch gate and stripes (lock order: they come
// before reclaim, which the checkpoint's release of freed chunks takes).
// When the journal is past emergencyFill (the background checkpoint fell
// behind) it writes a checkpoint (a tree commit) in the foreground,
// outside mu: readers and other writers go on meanwhile.
func (s *Store) makeLogRoom() error {
	if s.j == nil || s.opts.ReadOnly {
		// A read-only store writes no tree commit: the record that asked
		// for room is refused as read-only (logLocked), and the store
		// stays usable, whatever its replayed tail or journal fill.
		return nil
	}
	if s.m.TailLeaves() >= 2*s.opts.leafBound() {
		if err := s.bindTail(); err != nil {
			return err
		}
	}
	if s.j.Stats().Fill <= emergencyFill {
		return nil
	}
	s.fgMu.Lock()
	defer s.fgMu.Unlock()
	if s.j.Stats().Fill <= emergencyFill {
		return nil // another operation has just written one
	}
	if err := s.usable(); err != nil {
		return err
	}
	s.emergencies.Add(1)
	if err := s.treeCommit(s.ctx); err != nil {
		if s.ctx.Err() != nil {
			return err
		}
		return s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
	}
	return nil
}

// bindTail keeps the leaves that Open would replay after a crash under
// 2*treeCommitLeaves (plus what the records of writers already past this
// check touch). It is called when the changes not in a durable tree
// commit have touched that many: the background commit of the frozen
// ones has not ended while the open transaction touched as many again.
// It waits for that commit; the writer's record then captures the open
// transaction (maybeCaptureLocked), which has touched at least
// treeCommitLeaves. When none was outstanding (a capture could not be
// posted) it writes one itself. Called like makeLogRoom, with no lock of
// the store held but branch gates and stripes.
func (s *Store) bindTail() error {
	s.fgMu.Lock()
	defer s.fgMu.Unlock()
	if s.m.TailLeaves() < 2*s.opts.leafBound() {
		return nil // another writer has just waited or written one
	}
	s.mu.Lock()
	waited := s.capOut
	for s.capOut && s.failed.Load() == nil {
		s.capDone.Wait() // the checkpointer ends it even while Close runs
	}
	s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	if waited {
		s.leafWaits.Add(1)
		return nil
	}
	if s.m.TailLeaves() < 2*s.opts.leafBound() {
		return nil
	}
	s.leafCommits.Add(1)
	if err := s.treeCommit(s.ctx); err != nil {
		if s.ctx.Err() != nil {
			return err
		}
		return s.fail(fmt.Errorf("snapshot: checkpoint: %w", err))
	}
	return nil
}

// log takes mu and calls logLocked; a record the metadata region refused
// is tried once more after a tree commit (see commitForRoom).
func (s *Store) log(sc *scratch) (uint64, error) {
	for retried := false; ; retried = true {
		if err := s.makeLogRoom(); err != nil {
			return 0, err
		}
		s.lockForOps(sc) // no page read under s.mu (pagedindex.go)
		seq, err := s.logLocked(sc)
		s.unlockOps(sc)
		if retried {
			return seq, err
		}
		if retry, cerr := s.commitForRoom(err); !retry {
			return seq, cmp.Or(cerr, err)
		}
	}
}

// metaRoomError is logLocked's refusal of a record the metadata region
// may not have room for (it wraps ErrNoSpace).
type metaRoomError struct{ error }

func (e metaRoomError) Unwrap() error { return e.error }

// commitForRoom reports whether err is logLocked's refusal for want of
// metadata pages and a tree commit, which it then runs, may have made
// room: the pages that the changes since the last tree commit shadowed
// (and those of a commit in flight) stay held until a commit is durable,
// so without it a region that the tree fills to a third can refuse
// records. A region that is really full gets ErrNoSpace after at most
// one commit, and none while nothing was logged since the last one.
// A failed commit's error is returned (it, not ErrNoSpace, is what the
// caller must report). Called with no lock of the store held but branch
// gates and stripes.
func (s *Store) commitForRoom(err error) (retry bool, cerr error) {
	if err == nil {
		return false, nil // the common case, and errors.As's target would cost an allocation
	}
	var mr metaRoomError
	if !errors.As(err, &mr) {
		return false, nil
	}
	s.mu.Lock()
	worth := s.capOut || s.j == nil || s.j.LastSeq() > s.lastTreeSeq
	s.mu.Unlock()
	if !worth {
		return false, nil
	}
	if cerr := s.treeCommit(s.ctx); cerr != nil {
		return false, cerr
	}
	return true, nil
}

// commit makes every record appended so far durable. Chunks they freed
// become reusable at the next tree commit; a transient store (no journal)
// commits the tree here when some wait.
func (s *Store) commit(ctx context.Context) error {
	if s.j == nil {
		if s.alloc.hasPending() {
			return s.treeCommit(ctx)
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
// durable tree commits reusable. Called with no lock of the store held but
// branch gates and stripes (reclaim comes after them, before mu).
//
// It releases them a step at a time (meta.ReleaseFreesStep), each under
// its own hold of reclaim, so that neither reads nor the writer wait for
// all of a large commit's frees; with paced (a background or admin tree
// commit) it yields the processor between steps.
func (s *Store) releaseFreed(paced bool) {
	for {
		s.reclaim.Lock()
		more := s.m.ReleaseFreesStep()
		s.reclaim.Unlock()
		if !more {
			return
		}
		maybeYield(paced)
	}
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

// treeCommitEvery is how many commit intervals pass between background
// tree commits (when records were logged since the last one): it bounds
// the journal tail that Open replays.
const treeCommitEvery = 5

// committer commits pending records every CommitInterval, and drains the
// origin buffer then and whenever it is half full; every treeCommitEvery
// intervals it hands the checkpointer a tree commit. Its failures are
// kept: a failed commit fails the store, a failed origin write is
// reported by the next Flush.
func (s *Store) committer() {
	defer s.wg.Done()
	if s.opts.CommitInterval < 0 {
		return
	}
	t := time.NewTicker(s.opts.CommitInterval)
	defer t.Stop()
	ticks := 0
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			ticks++
			if s.ob.max > 0 {
				s.obIdleTick()
			}
		case <-s.ob.kick: // nil (never ready) with the buffer off
		}
		if s.usable() != nil {
			continue
		}
		if s.ob.n.Load() > 0 {
			_ = s.drainOrigin(s.ctx, true)
		} else {
			_ = s.commit(s.ctx)
		}
		if ticks >= treeCommitEvery {
			ticks = 0
			s.mu.Lock()
			if !s.capOut && s.j.LastSeq() > s.lastTreeSeq {
				s.postCaptureLocked()
			}
			s.mu.UnlockYield()
		}
	}
}

func (s *Store) getBuf() *[]byte  { return s.bufs.Get().(*[]byte) }
func (s *Store) putBuf(b *[]byte) { s.bufs.Put(b) }

func (s *Store) getScratch() *scratch {
	sc := s.scratch.Get().(*scratch)
	sc.ops, sc.cow, sc.frees, sc.reclaiming = sc.ops[:0], sc.cow[:0], sc.frees[:0], false
	return sc
}

// readMapAhead reads the data space map's pages of the chunks sc's ops
// free (sc.frees), with no lock held, so that the frees, under Store.mu and
// the layer's lock, do not read them there one at a time (a store whose
// map is paged out past its share of MetadataCache; see meta.ReadMapAhead).
// Then sc.frees is empty.
func (s *Store) readMapAhead(sc *scratch) {
	if len(sc.frees) > 0 {
		s.m.ReadMapAhead(sc.frees)
		sc.frees = sc.frees[:0]
	}
}

func (s *Store) putScratch(sc *scratch) { s.scratch.Put(sc) }

// chunkLen is the number of bytes of chunk c within the origin; a whole
// chunk past the origin's end (a volume larger than the origin).
func (s *Store) chunkLen(c uint64) int64 {
	if c >= s.chunks {
		return s.cs
	}
	return min(s.cs, s.geo.originSize-int64(c)*s.cs)
}

// storeOff is the store offset of data chunk loc.
func (s *Store) storeOff(loc uint64) int64 { return s.geo.dataOff + int64(loc)*s.cs }
