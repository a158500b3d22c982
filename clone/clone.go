// Package clone is the dm-clone model: a destination device hydrated in the
// background from a read-only source (possibly slow or remote), usable at
// once as a read-write blockdev.Device, without copy-on-write space and
// without a merge back.
//
// One bit per region (github.com/bits-and-blooms/bitset) says "this region
// is in the destination". Reads of hydrated regions go to the destination,
// others to the source; writes go to the destination, filling a partially
// written region from the source first. Background hydration copies the
// remaining regions, batching contiguous ones, with a window of bytes in
// flight that follows the source's bandwidth-delay product (many MiB for a
// remote source, little while user reads wait on the source); regions the
// source maps as holes or zeros (blockdev.AllocationMapper, which the NBD
// client offers through base:allocation) are hydrated as metadata, never
// read, and stay holes in the destination. User I/O never waits for a
// background copy's source read: reads go to the source at once, and a
// partial write takes its region from a copy that has not begun to write
// it (io.go). The bitmap is persisted on a
// small metadata device through package journal; every commit flushes the
// destination before it writes metadata, so a region marked hydrated always
// holds source data or data the user wrote, whatever a crash loses.
//
// When every region is hydrated (Done, Wait) the destination holds the
// whole volume and can be used alone.
//
// The I/O paths are in io.go, background hydration in hydrate.go (its
// window in pacer.go, the source's allocation map in srcmap.go), the
// metadata type (the in-core bitmap) in metadata.go, the on-disk formats in
// format.go, commit and recovery in commit.go, progress in status.go.
package clone

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	// MinRegionSize and MaxRegionSize bound Options.RegionSize.
	MinRegionSize = 4 << 10
	MaxRegionSize = 1 << 30
	// DefaultRegionSize is the region size when Options.RegionSize is 0.
	DefaultRegionSize = 64 << 10
	// copyBytes is the size of one background copy when BatchSize is 0.
	copyBytes = 1 << 20
)

// Sentinel errors.
var (
	// ErrGeometry: Open was given devices or options that do not match the
	// geometry recorded at Create. The error is a *GeometryError.
	ErrGeometry = errors.New("clone: geometry mismatch")
	// ErrUnclean: the clone ran with metadata sync off and was not closed
	// cleanly; which regions were hydrated is lost, so its contents are.
	ErrUnclean = errors.New("clone: unsynced clone was not closed cleanly")
	// ErrOptions: invalid Options or devices at Create.
	ErrOptions = errors.New("clone: invalid options")
)

// GeometryError says which recorded value differs from what Open was given.
type GeometryError struct {
	Field          string
	Recorded, Have int64
}

func (e *GeometryError) Error() string {
	return fmt.Sprintf("clone: geometry mismatch: %s recorded %d, given %d", e.Field, e.Recorded, e.Have)
}

// Unwrap makes errors.Is(err, ErrGeometry) hold.
func (e *GeometryError) Unwrap() error { return ErrGeometry }

// Options configures Create and Open. The zero value is a good default.
type Options struct {
	// RegionSize is the unit of hydration in bytes: a power of two from 4
	// KiB to 1 GiB. 0 means 64 KiB at Create and the recorded size at Open;
	// a different non-zero size at Open is a geometry error.
	RegionSize int64
	// HydrationThreshold caps the regions background hydration keeps in
	// flight. Within the cap the window of bytes in flight adapts to the
	// source's bandwidth-delay product. 0 means DefaultMaxInFlight bytes'
	// worth (at least one batch).
	HydrationThreshold int
	// BatchSize is the most contiguous regions copied by one background
	// copy (one source read). 0 means as many as fit 1 MiB (at least one).
	// Batches are smaller while the window is small (a slow or nearby
	// source), so that user reads of the source wait behind little.
	BatchSize int
	// CommitInterval is how often hydration progress and user writes to
	// unhydrated regions are committed without a Flush. 0 means 1 s;
	// negative means only on Flush, FUA writes and Close.
	CommitInterval time.Duration
	// NoDiscardPassdown: discards are not passed to the destination; the
	// discarded range is zeroed with WriteZeroes instead (it must read as
	// zeros) and stays allocated.
	NoDiscardPassdown bool
	// HydrateOnRead: a read of an unhydrated region hydrates it (copies the
	// whole region) instead of reading just the requested part from the
	// source.
	HydrateOnRead bool
	// NoMetadataSync: Flush, FUA and the commit interval do not write
	// metadata (a throwaway clone). Close still commits. After a crash the
	// clone cannot be opened (ErrUnclean).
	NoMetadataSync bool
	// RateLimit caps background hydration in bytes per second; 0 means no
	// cap. User I/O is never limited, and runs of the source that are holes
	// or zeros (see blockdev.AllocationMapper) cost nothing. SetRateLimit
	// changes it while running.
	RateLimit int64
	// NoHydration starts with background hydration paused (Resume starts
	// it). User I/O hydrates the regions it touches either way.
	NoHydration bool
	// Progress, if set, is called from the hydration goroutine with the
	// current Status at most every ProgressInterval while hydration makes
	// progress and at every change of state (source errors included), and
	// once more from Close. Calls never overlap. It must not call Close.
	Progress func(Status)
	// ReadOnly opens the clone for inspection (Open only): nothing is
	// written to the destination or the metadata, not even the journal's
	// new epoch, so the devices may be blockdev.ReadOnly views. Reads,
	// Status and Check work (a read of an unhydrated region goes to the
	// source; HydrateOnRead is ignored); hydration does not run; writes,
	// FUA writes and discards fail with blockdev.ErrReadOnly.
	ReadOnly bool
	// ProgressInterval: 0 means 250 ms.
	ProgressInterval time.Duration
	// RetryMin and RetryMax bound the backoff after a failed background
	// copy (source or destination error): RetryMin doubling up to RetryMax.
	// 0 means 10 ms and 5 s.
	RetryMin, RetryMax time.Duration

	// test hooks (package tests only)
	testBugOrder    bool                                 // commit metadata before flushing the destination (dm-clone's bug)
	testAfterCommit func()                               // called right after each metadata commit
	testAfter       func(time.Duration) <-chan time.Time // replaces time.After in backoff waits
	testEarlyCommit int64                                // replaces earlyCommit
}

// Clone is a blockdev.Device whose contents are the source's, overlaid with
// the writes made through it, stored in the destination as regions hydrate.
// It is safe for concurrent use.
type Clone struct {
	src, dst, meta blockdev.Device
	opts           Options
	geo            geometry
	size           int64
	bs             int
	shift          uint // log2(region size)
	batch          int
	bufSize        int

	md  *metadata
	hyd *hydrator

	// io guards the regions being hydrated; see io.go. Lock order:
	// metadata.commitMu, then io.mu, then metadata.mu.
	io struct {
		sync.Mutex
		flights map[uint64]*flight
		free    []*flight // released flights, for reuse
		cond    sync.Cond // signalled when a flight ends and waiters > 0
		waiters int       // claims waiting on cond
	}
	bufs sync.Pool // *[]byte of bufSize, aligned for O_DIRECT

	// life: user calls hold it shared; Close takes it exclusively once
	// closed is set, so Close waits for calls in progress.
	life    sync.RWMutex
	closed  atomic.Bool
	userSrc atomic.Int32 // user reads of the source in progress (hydration yields to them)

	ctx    context.Context // cancelled by Close; stops every goroutine
	cancel context.CancelFunc
	wg     sync.WaitGroup // background goroutines

	unlock func() // releases the devices' locks (lock.go); called by Close
}

// Create formats meta for a new clone of src onto dst and returns it open,
// with background hydration running (unless Options.NoHydration). dst must
// be at least as large as src; the clone's size is src's. The clone does not
// own the devices: Close leaves them open. Create and Open lock dst and
// meta (lock.go): ErrLocked while another Clone has them.
func Create(src, dst, meta blockdev.Device, opts Options) (*Clone, error) {
	if opts.ReadOnly {
		return nil, fmt.Errorf("%w: Create of a read-only clone", ErrOptions)
	}
	return withLocks(src, dst, meta, opts, create)
}

func create(src, dst, meta blockdev.Device, opts Options) (*Clone, error) {
	if opts.ReadOnly {
		return nil, fmt.Errorf("%w: Create of a read-only clone", ErrOptions)
	}
	g, err := newGeometry(src, dst, meta, opts)
	if err != nil {
		return nil, err
	}
	c := newClone(src, dst, meta, opts, g)
	md, err := formatMetadata(c, g)
	if err != nil {
		return nil, err
	}
	c.md = md
	if err := c.start(); err != nil {
		return nil, err
	}
	return c, nil
}

// Open opens the clone recorded on meta, recovers the hydration state from
// its journal and resumes hydration where it stopped. src and dst must be
// the devices it was created with (sizes and block sizes are checked).
func Open(src, dst, meta blockdev.Device, opts Options) (*Clone, error) {
	return withLocks(src, dst, meta, opts, open)
}

func open(src, dst, meta blockdev.Device, opts Options) (*Clone, error) {
	sb := make([]byte, superArea)
	if meta.Size() < superArea {
		return nil, fmt.Errorf("clone: open: metadata device of %d bytes: %w", meta.Size(), ErrCorrupt)
	}
	if _, err := meta.ReadAt(sb, 0); err != nil {
		return nil, fmt.Errorf("clone: open: read superblock: %w", err)
	}
	g, err := decodeSuperblock(sb, meta.Size())
	if err != nil {
		return nil, fmt.Errorf("clone: open: %w", err)
	}
	if err := checkGeometry(g, src, dst, opts); err != nil {
		return nil, err
	}
	c := newClone(src, dst, meta, opts, g)
	md, err := openMetadata(c, g)
	if err != nil {
		return nil, err
	}
	c.md = md
	if err := c.start(); err != nil {
		return nil, err
	}
	return c, nil
}

// MetadataSize returns the smallest metadata device, in bytes, for a clone
// of a source of sourceSize bytes with the given region size (0: default).
func MetadataSize(sourceSize, regionSize int64) int64 {
	if regionSize == 0 {
		regionSize = DefaultRegionSize
	}
	return superArea + journalSizeFor(regionCount(sourceSize, regionSize))
}

func newGeometry(src, dst, meta blockdev.Device, opts Options) (geometry, error) {
	rs := opts.RegionSize
	if rs == 0 {
		rs = DefaultRegionSize
	}
	sbs, dbs := int64(src.BlockSize()), int64(dst.BlockSize())
	switch {
	case rs < MinRegionSize || rs > MaxRegionSize || rs&(rs-1) != 0:
		return geometry{}, fmt.Errorf("%w: region size %d: a power of two from %d to %d", ErrOptions, rs, MinRegionSize, MaxRegionSize)
	case rs%sbs != 0 || rs%dbs != 0:
		return geometry{}, fmt.Errorf("%w: region size %d is not a multiple of the block sizes %d and %d", ErrOptions, rs, sbs, dbs)
	case src.Size() <= 0:
		return geometry{}, fmt.Errorf("%w: empty source", ErrOptions)
	case dst.Size() < src.Size():
		return geometry{}, fmt.Errorf("%w: destination of %d bytes is smaller than the source (%d)", ErrOptions, dst.Size(), src.Size())
	case src.Size()%max(sbs, dbs) != 0:
		return geometry{}, fmt.Errorf("%w: source size %d is not a multiple of the destination block size %d", ErrOptions, src.Size(), dbs)
	}
	regions := regionCount(src.Size(), rs)
	need := superArea + journalSizeFor(regions)
	if meta.Size() < need {
		return geometry{}, fmt.Errorf("%w: metadata device of %d bytes; %d regions need %d (see MetadataSize)", ErrOptions, meta.Size(), regions, need)
	}
	jl := meta.Size() - superArea
	jl -= jl % int64(meta.BlockSize())
	return geometry{
		RegionSize: rs, SourceSize: src.Size(), DestSize: dst.Size(),
		SourceBlock: uint32(sbs), DestBlock: uint32(dbs), Regions: regions,
		JournalOffset: superArea, JournalLength: jl, CheckpointSize: checkpointSlotFor(regions),
	}, nil
}

func checkGeometry(g geometry, src, dst blockdev.Device, opts Options) error {
	for _, c := range []struct {
		field    string
		rec, got int64
	}{
		{"source size", g.SourceSize, src.Size()},
		{"destination size", g.DestSize, dst.Size()},
		{"source block size", int64(g.SourceBlock), int64(src.BlockSize())},
		{"destination block size", int64(g.DestBlock), int64(dst.BlockSize())},
	} {
		if c.rec == c.got {
			continue
		}
		// A source whose block size now divides the recorded one serves
		// every request the clone was made for: an NBD server that came to
		// advertise a smaller minimum block size (512 where it said 4096)
		// still serves the same image.
		if c.field == "source block size" && c.got > 0 && c.got < c.rec && c.rec%c.got == 0 {
			continue
		}
		return &GeometryError{Field: c.field, Recorded: c.rec, Have: c.got}
	}
	if opts.RegionSize != 0 && opts.RegionSize != g.RegionSize {
		return &GeometryError{Field: "region size", Recorded: g.RegionSize, Have: opts.RegionSize}
	}
	return nil
}

func newClone(src, dst, meta blockdev.Device, opts Options, g geometry) *Clone {
	if opts.CommitInterval == 0 {
		opts.CommitInterval = time.Second
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = 250 * time.Millisecond
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = 10 * time.Millisecond
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = 5 * time.Second
	}
	opts.RetryMax = max(opts.RetryMax, opts.RetryMin)
	if opts.ReadOnly {
		opts.NoHydration, opts.HydrateOnRead = true, false // Status says paused
	}
	c := &Clone{src: src, dst: dst, meta: meta, opts: opts, geo: g, size: g.SourceSize}
	c.bs = max(src.BlockSize(), dst.BlockSize())
	for int64(1)<<c.shift < g.RegionSize {
		c.shift++
	}
	c.batch = opts.BatchSize
	if c.batch <= 0 {
		c.batch = int(max(1, copyBytes/g.RegionSize))
	}
	c.bufSize = int(min(g.RegionSize*int64(c.batch), max(g.RegionSize, 4<<20), 16<<20))
	c.bufSize = int(min(int64(c.bufSize), max(g.RegionSize, copyBytes)))
	c.bufs.New = func() any {
		b := blockdev.AlignedBuffer(c.bufSize)
		return &b
	}
	c.io.flights = make(map[uint64]*flight)
	c.io.cond.L = &c.io.Mutex
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// start launches the background goroutines.
func (c *Clone) start() error {
	c.hyd = newHydrator(c)
	if c.opts.ReadOnly {
		return nil // no hydration, nothing to commit
	}
	c.wg.Add(2)
	go func() { defer c.wg.Done(); c.hyd.run() }()
	go func() { defer c.wg.Done(); c.md.committer(c.ctx, c.opts.CommitInterval) }()
	return nil
}

// enter admits a user call; it returns false after Close. A true return
// must be paired with leave.
func (c *Clone) enter() bool {
	c.life.RLock()
	if c.closed.Load() {
		c.life.RUnlock()
		return false
	}
	return true
}

func (c *Clone) leave() { c.life.RUnlock() }

// Size implements blockdev.Device: the source's size.
func (c *Clone) Size() int64 { return c.size }

// BlockSize implements blockdev.Device: the larger of the source's and the
// destination's block sizes.
func (c *Clone) BlockSize() int { return c.bs }

// RegionSize returns the region size in bytes.
func (c *Clone) RegionSize() int64 { return c.geo.RegionSize }

// Close stops hydration, waits for calls in progress, commits the metadata
// (a clean shutdown, also with NoMetadataSync) and closes the journal. The
// source, destination and metadata devices stay open. Reopening with Open
// continues where hydration stopped.
func (c *Clone) Close() error {
	if c.closed.Swap(true) {
		return fmt.Errorf("clone: close: %w", blockdev.ErrClosed)
	}
	c.cancel()    // stops hydration and the committer; releases their flights
	c.wg.Wait()   // background goroutines gone
	c.life.Lock() // user calls drained; new ones see closed
	defer c.life.Unlock()
	err := c.md.close()
	c.hyd.finish()
	c.unlock()
	if err != nil {
		return fmt.Errorf("clone: close: %w", err)
	}
	return nil
}
