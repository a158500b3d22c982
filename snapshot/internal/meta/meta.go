package meta

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/lockstat"
)

// DefaultCacheBytes is the node cache size when Options.CacheBytes is 0.
const DefaultCacheBytes = 64 << 20

// Options configure Format and Open. The zero value is a good default.
type Options struct {
	// Pages is the number of metadata pages Format uses (0: the whole
	// device). Grow extends it later, up to the device's size.
	Pages uint64
	// DataChunks is the size of the data space map Format creates.
	DataChunks uint64
	// CacheBytes bounds the decoded-node cache (0: DefaultCacheBytes).
	// Dirty nodes are written back once they pass half of it.
	CacheBytes int
	// MapBytes bounds the memory of the data space map's partly used
	// bitmap pages (0: CacheBytes/8; at least one page): past it, pages
	// are paged out and read back on use; a page the open transaction
	// changed is written to its page of that transaction first. Pages all
	// clear or all set cost nothing either way.
	MapBytes int
	// ReadOnly opens without ever writing the device.
	ReadOnly bool
	// SyncWriteBack writes dirty nodes back in the writer's own calls
	// instead of in a background goroutine. Tests use it so that a seed
	// replays the same device calls.
	SyncWriteBack bool
	// LowSpaceThreshold and LowSpace: LowSpace(free, total) is called,
	// without locks held, when the free metadata pages drop below the
	// threshold (once per crossing).
	LowSpaceThreshold uint64
	LowSpace          func(free, total uint64)
	// Outer, DataOff and ChunkBytes say where data chunk k lives: at
	// DataOff + k*ChunkBytes on Outer. GrowFromData needs them, and so
	// does opening a region that grew (extent.go). The Meta's device is
	// expected to be a part of Outer: a grown region's commits flush
	// Outer only.
	Outer      blockdev.Device
	DataOff    int64
	ChunkBytes int64
}

// Key is one index key: branch, chunk, epoch.
type Key struct {
	B uint32
	C uint64
	E uint32
}

func (k Key) run(loc uint64) run { return run{b: k.B, c: k.C, e: k.E, n: 1, loc: loc} }

// tree is one B+tree's current root. Guarded by Meta.mu.
type tree struct {
	kind  kind
	root  ptr
	level uint16
	runs  uint64
}

// state is what a commit makes durable and a View reads.
type state struct {
	tx           uint64
	chunk, epoch tree
	keys         uint64
	pages        uint64
	dataChunks   uint64
	metaIdx      []ptr
	dataIdx      []ptr
	metaPages    int // bitmap pages per map, to read them back
	dataPages    int
	ext          []extent // the region's extents (extent.go)
}

// freeBatch is what transaction tx freed; it becomes reusable once tx is
// durable and no view is older than tx.
type freeBatch struct {
	tx         uint64
	meta, data []uint64
}

// grownRun is a data space map grow's new chunks [from, to), held until
// transaction tx (which records the grown map) is durable: a journal
// record naming one before then would name a chunk past the end of the
// map a crash leaves.
type grownRun struct{ tx, from, to uint64 }

// Meta is an open metadata region. One writer at a time changes the
// current transaction (all methods lock Meta.mu); any number of Views read
// committed transactions without that lock.
type Meta struct {
	dev  blockdev.Device
	opts Options
	// layout maps pages to devices (extent.go); replaced, never changed.
	layout atomic.Pointer[layout]

	// commitMu serialises commits: a commit writes its pages without mu
	// (section 5 of docs/metadata.md), so the writer goes on meanwhile.
	// It also guards commitBuf, commitBatch and cstats. Lock order:
	// commitMu -> wbMu -> mu -> viewMu -> cache.mu.
	commitMu sync.Mutex
	// commitBuf holds a frozen commit's encoded space-map pages and
	// superblock; commitBatch the commitBatch nodes it encodes at a time.
	commitBuf   []byte
	commitBatch []byte
	cstats      CommitStats

	// wbMu guards wbWritten and wbErr; wbCond, on wbMu, tells a commit
	// waiting for the pages queued before its freeze that more were
	// written. The write-back goroutine takes no other lock.
	wbMu      sync.Mutex
	wbCond    *sync.Cond
	wbWritten uint64 // pages the goroutine and helping writers have written (or failed)
	wbErr     error  // its first write error
	wbStopped bool   // Close stopped the goroutine (Throttle stops waiting and helping)
	wbHelping int    // writers writing a queued slot in Throttle (Close waits for them)
	wbWaiting int    // writers waiting in Throttle for a page written (writeSlot then yields)
	// wbSeq[i] is 1 + the queue sequence number (wbQueued before it was
	// queued) of the page in slot i while it is queued or being written,
	// 0 otherwise: set under mu before the slot is queued, cleared by
	// whoever wrote it before it takes wbMu to say so. A throttled writer
	// may write a later slot before the goroutine writes an earlier one,
	// so a commit waits for the slots queued before its freeze by these,
	// not by a count of pages written.
	wbSeq []atomic.Uint64
	// The slots and the channels between the writer and the goroutine
	// (nil: SyncWriteBack or read-only). A slot index is in exactly one
	// of wbFree (guarded by mu), wbQueue, the goroutine's hands and
	// wbReaped.
	wbSlot   []wbSlot
	wbQueue  chan int
	wbReaped chan int
	wbStop   chan struct{}
	wbDone   chan struct{}

	// mu guards the open transaction: everything below up to viewMu.
	// Changes (Put, Delete, the freeze, write-back) hold it exclusively;
	// lookups of the open transaction (Get, Seek, Prev, Ascend...) hold it
	// shared, each with its own reader from readers, and may load nodes
	// into the cache meanwhile (docs/metadata.md section 8).
	mu       lockstat.RWMutex // a sync.RWMutex that keeps its longest hold and wait
	tx       uint64           // the open transaction
	durable  uint64           // the last durable transaction
	chunk    tree
	epoch    tree
	keys     uint64
	metaSM   *spaceMap
	dataSM   *spaceMap
	deferred []freeBatch
	grown    []grownRun
	changed  bool
	failed   error
	closed   bool
	lowFired bool
	user     uint64 // the user word the next commit records (store_api.go)
	overlay  bool   // changes stay in memory, never written (OpenOverlay)
	opened   uint64 // the transaction Open read (Changed compares with it)
	buf      []byte // page buffer for writes
	nodeBuf  []*node
	wbFree   []int  // write-back slots not in flight
	wbQueued uint64 // pages queued to the write-back goroutine so far
	// openWrites counts the writes of the open transaction's pages the
	// writer queued or made itself, and openWriteLocs holds the pages of
	// the last openWriteRing of them, each at its count modulo the ring:
	// a lookup that read such a page without mu uses what it read only
	// if no write of it was queued since (openUnwritten).
	openWrites    uint64
	openWriteLocs [openWriteRing]uint64
	pathBuf       []*node
	idxBuf        []int
	rd            reader // the writer's reader (see Meta.reader)
	missMark      uint64 // the cache's misses when the change in progress began (lockChange)
	// wMiss counts the pages the writer's own walks read (loadW);
	// wMissMark is its value when the change in progress began.
	wMiss, wMissMark uint64
	frozen           state // what the commit in flight makes durable
	// frozenBytes is the cache cost of the commit in flight's nodes,
	// pinned until it has written them.
	frozenBytes int

	// viewMu guards committed and views.
	viewMu    sync.Mutex
	committed state
	views     map[uint64]int // committed tx -> open views

	cache   *cache
	pool    sync.Pool // page buffers for reads
	readers sync.Pool // *reader for lookups under mu shared (sharedReader)
	// viewLoads and viewYield pace the walks of committed pages
	// (viewPace): loads counted, and when one of them last yielded.
	viewLoads atomic.Uint64
	viewYield atomic.Int64
	// overHard: a change found the open transaction's dirty nodes past
	// three quarters of the cache with every write-back slot in flight;
	// Throttle waits while it is set (set under mu, read without it).
	overHard atomic.Bool
	// maxRead, maxSelfWrite and maxChangeMiss are the Stalls maxima
	// (atomic: noted under mu shared, or outside it).
	maxRead, maxSelfWrite, maxChangeMiss lockstat.Max
	// maxThrottle is the longest a writer waited in Throttle for
	// write-back, throttled how many Throttle calls waited.
	maxThrottle   lockstat.Max
	throttled     atomic.Uint64
	wbHelped      atomic.Uint64 // pages throttled writers wrote themselves
	changesMissed atomic.Uint64
	// lockedReads counts the pages read with mu held, shared or
	// exclusively (Stalls.LockedReads): a change waiting for mu waits
	// for each of them.
	lockedReads atomic.Uint64
	// mapLockedReads: of lockedReads, the data map's bitmap pages
	// (Space.MapLockedReads).
	mapLockedReads atomic.Uint64
	// prefetch is how many more Prefetch calls load nodes (Prefetch);
	// atomic, since prefetches run under mu shared.
	prefetch atomic.Int64
	// txLeaves counts the leaves the open transaction wrote: the leaves
	// of earlier transactions its changes shadowed, and the new ones
	// splits made, which a replay of those changes after a crash writes
	// again (the work of a replay is its leaves, not its changes).
	// frozenLeaves is the frozen transaction's count until it is
	// durable (0 when none is outstanding). Both change under mu held
	// exclusively; atomic so that the store reads them without mu, once
	// per record (TailLeaves).
	txLeaves, frozenLeaves atomic.Int64
	// evictMark is the cache's eviction count when Prefetch last found
	// itself off (atomic, as prefetch).
	evictMark atomic.Uint64
}

// TouchedLeaves is how many leaves the open transaction has written:
// each leaf of an earlier transaction that its changes touched (shadowed)
// counted once, and each leaf a split added.
func (m *Meta) TouchedLeaves() int { return int(m.txLeaves.Load()) }

// TailLeaves is TouchedLeaves of the transactions that are not durable
// yet (the open one, and a frozen one being written): about the leaves a
// replay of their changes writes after a crash now (a leaf both touched
// counts twice).
func (m *Meta) TailLeaves() int { return int(m.txLeaves.Load() + m.frozenLeaves.Load()) }

// Format initialises a metadata region on dev and returns it open.
func Format(dev blockdev.Device, opts Options) (*Meta, error) {
	if opts.ReadOnly {
		return nil, fmt.Errorf("meta: format: %w", ErrReadOnly)
	}
	if opts.Pages == 0 {
		opts.Pages = uint64(dev.Size()) / PageSize
	}
	if err := checkGeometry(dev, opts.Pages, opts.DataChunks); err != nil {
		return nil, err
	}
	m := newMeta(dev, opts)
	m.layout.Store(&layout{base: opts.Pages})
	m.metaSM = newSpaceMap(opts.Pages)
	m.metaSM.set(0) // the superblocks': the metadata map never pages out, so no error
	m.metaSM.set(1)
	m.dataSM = newSpaceMap(opts.DataChunks)
	m.pageOut(m.dataSM)
	m.tx = 1
	m.chunk, m.epoch = tree{kind: chunkTree}, tree{kind: epochTree}
	zero := make([]byte, 2*PageSize)
	if _, err := dev.WriteAt(zero, 0); err != nil {
		return nil, fmt.Errorf("meta: format: %w", err)
	}
	m.changed = true
	if err := m.Commit(); err != nil {
		return nil, err
	}
	m.startWriteBack()
	return m, nil
}

func checkGeometry(dev blockdev.Device, pages, chunks uint64) error {
	if pages < 16 || pages > uint64(dev.Size())/PageSize {
		return fmt.Errorf("meta: %d pages on a device of %d bytes: %w", pages, dev.Size(), ErrInvalid)
	}
	if PageSize%dev.BlockSize() != 0 {
		return fmt.Errorf("meta: block size %d: %w", dev.BlockSize(), ErrInvalid)
	}
	if idxFor(pagesFor(pages))+idxFor(pagesFor(chunks)) > maxIdxPtrs {
		return fmt.Errorf("meta: %d pages and %d chunks need more index pages than the superblock holds: %w", pages, chunks, ErrInvalid)
	}
	return nil
}

func newMeta(dev blockdev.Device, opts Options) *Meta {
	if opts.CacheBytes <= 0 {
		opts.CacheBytes = DefaultCacheBytes
	}
	m := &Meta{dev: dev, opts: opts, buf: make([]byte, PageSize), cache: newCache(opts.CacheBytes), views: make(map[uint64]int)}
	m.pool.New = func() any { b := make([]byte, PageSize); return &b }
	m.prefetch.Store(prefetchWindow) // the cache starts empty
	m.wbCond = sync.NewCond(&m.wbMu)
	return m
}

// startWriteBack starts the write-back goroutine of a writable Meta.
func (m *Meta) startWriteBack() {
	if m.opts.ReadOnly || m.opts.SyncWriteBack {
		return
	}
	m.wbStop, m.wbDone = make(chan struct{}), make(chan struct{})
	slots := wbSlotsFor(m.cache.limit)
	m.wbQueue, m.wbReaped = make(chan int, slots), make(chan int, slots)
	m.wbSlot = make([]wbSlot, slots)
	m.wbSeq = make([]atomic.Uint64, slots)
	bufs := make([]byte, slots*PageSize)
	for i := range m.wbSlot {
		m.wbSlot[i].buf = bufs[i*PageSize : (i+1)*PageSize]
		m.wbFree = append(m.wbFree, i)
	}
	go m.writeBackLoop()
}

// Open opens the metadata region on dev: it reads both superblocks, takes
// the newer valid one, and loads the space maps. It reads no tree node.
func Open(dev blockdev.Device, opts Options) (*Meta, error) { return open(dev, opts, false) }

// open is Open; overlay makes the Meta an overlay (OpenOverlay) from the
// start, so that a page its Open finds reused is reported as a change
// (changed.go).
func open(dev blockdev.Device, opts Options, overlay bool) (*Meta, error) {
	m := newMeta(dev, opts)
	m.overlay = overlay
	var best *super
	var errs []error
	for slot := uint64(0); slot < 2; slot++ {
		p := make([]byte, PageSize)
		if _, err := dev.ReadAt(p, int64(slot)*PageSize); err != nil {
			return nil, fmt.Errorf("meta: open: %w", err)
		}
		s, err := decodeSuper(p, slot)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if best == nil || s.tx > best.tx {
			best = s
		}
	}
	if best == nil {
		return nil, fmt.Errorf("meta: open: no valid superblock: %w", errors.Join(errs...))
	}
	if len(best.ext) == 0 && best.pages > uint64(dev.Size())/PageSize {
		return nil, fmt.Errorf("meta: open: %w: superblock has %d pages, device %d bytes", ErrCorrupt, best.pages, dev.Size())
	}
	if err := m.setLayout(best.pages, best.dataChunks, best.ext); err != nil {
		return nil, fmt.Errorf("meta: open: %w", err)
	}
	m.tx, m.opened = best.tx+1, best.tx
	m.chunk = tree{kind: chunkTree, root: best.chunkRoot, level: best.chunkLevel, runs: best.chunkRuns}
	m.epoch = tree{kind: epochTree, root: best.epochRoot, level: best.epochLevel, runs: best.epochRuns}
	m.keys = best.keys
	m.user = best.user
	var err error
	if m.metaSM, err = m.loadMap(best.pages, best.metaIdx, best.pages, best.tx, false); err != nil {
		return nil, m.changedOr(err)
	}
	if m.dataSM, err = m.loadMap(best.dataChunks, best.dataIdx, best.pages, best.tx, true); err != nil {
		return nil, m.changedOr(err)
	}
	if m.metaSM.used != best.metaUsed || m.dataSM.used != best.dataUsed || m.metaSM.words[0][0]&3 != 3 {
		return nil, fmt.Errorf("meta: open: %w: space maps count %d pages and %d chunks in use, superblock %d and %d",
			ErrCorrupt, m.metaSM.used, m.dataSM.used, best.metaUsed, best.dataUsed)
	}
	st := m.snapshotState()
	st.tx = best.tx
	m.durable = best.tx
	m.publish(st)
	m.startWriteBack()
	return m, nil
}

// pageOut makes s, the data map, one that pages out past Options.MapBytes.
func (m *Meta) pageOut(s *spaceMap) {
	b := m.opts.MapBytes
	if b <= 0 {
		b = m.opts.CacheBytes / 8
	}
	s.limit = max(1, b/len(bitPage{})/8)
	s.fetch = func(pi uint64, raw []byte, p *bitPage) error {
		bp := s.pages[pi]
		m.lockedReads.Add(1) // under mu (ReadMapAhead reads without it)
		m.mapLockedReads.Add(1)
		if err := m.readPage(raw, bp.loc); err != nil {
			return err
		}
		return decodeBitmap(raw, bp.loc, bp.tx, int(pi), s.nbits, p)
	}
	if m.opts.ReadOnly || m.overlay {
		return // never written: dirty pages stay in memory
	}
	// store writes dirty page pi to its page of the open transaction,
	// shadowing it first if it has none (once per transaction, as
	// shadowMaps would at the commit, which then leaves it alone unless it
	// changes again). No durable superblock reaches that page, so a crash
	// after the write loses nothing; the commit's first flush covers it.
	s.store = func(pi uint64, raw []byte) error {
		if s.pages[pi].tx != m.tx {
			if err := m.shadowMapPage(s, int(pi)); err != nil {
				return err
			}
			m.changed = true
		}
		s.encodeBitmap(raw, int(pi), s.pages[pi].loc, m.tx)
		return m.writePage(raw, s.pages[pi].loc)
	}
}

// loadWindow is how many bitmap pages loadMap reads at once.
const loadWindow = 32

// loadMap reads a space map of nbits through its index pages; the data
// map (dataSM) pages out as it goes.
func (m *Meta) loadMap(nbits uint64, idx []ptr, pages, tx uint64, dataSM bool) (*spaceMap, error) {
	s := newSpaceMap(nbits)
	s.durable = tx
	if dataSM {
		m.pageOut(s)
	}
	np := len(s.pages)
	p := make([]byte, PageSize)
	for j, ip := range idx {
		if err := m.readPage(p, ip.loc); err != nil {
			return nil, err
		}
		want := min(idxPerPage, np-j*idxPerPage)
		ents, err := decodeIndex(p, ip.loc, ip.tx, want, pages)
		if err != nil {
			return nil, err
		}
		copy(s.pages[j*idxPerPage:], ents)
	}
	// The bitmap pages lie where their last commit shadowed them, one
	// read each: read loadWindow at a time, concurrently, so that Open
	// waits for about one read per window, not one per page.
	bits := new(bitPage)
	raw := make([]byte, loadWindow*PageSize)
	for lo := 0; lo < len(s.pages); lo += loadWindow {
		hi := min(lo+loadWindow, len(s.pages))
		var g errgroup.Group
		for i := lo; i < hi; i++ {
			g.Go(func() error { return m.readPage(raw[(i-lo)*PageSize:(i-lo+1)*PageSize], s.pages[i].loc) })
		}
		if err := g.Wait(); err != nil {
			return nil, err
		}
		for i := lo; i < hi; i++ {
			bp := s.pages[i]
			if err := decodeBitmap(raw[(i-lo)*PageSize:(i-lo+1)*PageSize], bp.loc, bp.tx, i, nbits, bits); err != nil {
				return nil, err
			}
			s.dirtyPage[i] = false
			s.load(i, bits)
			if s.words[i] == bits { // kept: the next page needs its own
				if bits = s.spare; bits == nil {
					bits = new(bitPage)
				}
				s.spare = nil
			}
		}
	}
	copy(s.idx, idx)
	clear(s.dirtyPage)
	clear(s.dirtyIndex)
	return s, nil
}

func (m *Meta) readPage(p []byte, loc uint64) error {
	dev, off := m.locate(loc)
	if _, err := dev.ReadAt(p, off); err != nil {
		return fmt.Errorf("meta: read page %d: %w", loc, err)
	}
	return nil
}

func (m *Meta) writePage(p []byte, loc uint64) error { return m.writePages(p, loc) }

// writePages writes the pages in p to consecutive pages from loc, with one
// write where they lie in one region (locate: the metadata region may be
// in parts, after GrowMetadata).
func (m *Meta) writePages(p []byte, loc uint64) error {
	for len(p) > 0 {
		dev, off, end := m.locateRun(loc)
		n := int(min(uint64(len(p)/PageSize), end-loc))
		if _, err := dev.WriteAt(p[:n*PageSize], off); err != nil {
			if n == 1 {
				return fmt.Errorf("meta: write page %d: %w", loc, err)
			}
			return fmt.Errorf("meta: write pages %d-%d: %w", loc, loc+uint64(n)-1, err)
		}
		p, loc = p[n*PageSize:], loc+uint64(n)
	}
	return nil
}

// snapshotState captures the open transaction's roots, counts and map
// pointers, as a commit freezes them. Callers hold m.mu.
func (m *Meta) snapshotState() state {
	return state{tx: m.tx, chunk: m.chunk, epoch: m.epoch, keys: m.keys,
		pages: m.metaSM.nbits, dataChunks: m.dataSM.nbits,
		metaIdx: append([]ptr(nil), m.metaSM.idx...), dataIdx: append([]ptr(nil), m.dataSM.idx...),
		metaPages: len(m.metaSM.pages), dataPages: len(m.dataSM.pages), ext: m.extentsOf()}
}

// publish makes st, now durable, what new Views read.
func (m *Meta) publish(st state) {
	m.viewMu.Lock()
	defer m.viewMu.Unlock()
	m.committed = st
}

// usable returns an error if the writer may not change anything.
func (m *Meta) usable() error {
	switch {
	case m.closed:
		return ErrClosed
	case m.opts.ReadOnly:
		return ErrReadOnly
	case m.failed != nil:
		return fmt.Errorf("%w: %w", ErrFailed, m.failed)
	}
	return nil
}

// fail records a device error: the open transaction is lost.
func (m *Meta) fail(err error) error {
	if m.failed == nil {
		m.failed = err
	}
	return err
}

// allocPage takes a free metadata page.
func (m *Meta) allocPage() (uint64, error) {
	loc, ok, _ := m.metaSM.alloc() // the metadata map never pages out: no error
	if !ok {
		return 0, fmt.Errorf("meta: metadata region full (%d pages): %w", m.metaSM.nbits, ErrNoSpace)
	}
	m.cache.drop(loc)
	return loc, nil
}

func (m *Meta) batch() *freeBatch {
	if n := len(m.deferred); n == 0 || m.deferred[n-1].tx != m.tx {
		m.deferred = append(m.deferred, freeBatch{tx: m.tx})
	}
	return &m.deferred[len(m.deferred)-1]
}

// freePage releases a metadata page: cleared in the map now, reusable
// once this transaction is durable and no view can reach the page.
func (m *Meta) freePage(loc uint64) {
	if n := m.cache.get(loc); n != nil && n.tx == m.tx {
		m.cache.drop(loc) // never committed: nothing will read it
	}
	m.metaSM.clear(loc)
	m.metaSM.hold(loc)
	b := m.batch()
	b.meta = append(b.meta, loc)
}

// releaseFrees makes reusable what committed transactions freed and no
// open view can still reach.
func (m *Meta) releaseFrees() { m.releaseSome(-1) }

// releaseSome is releaseFrees that stops after about max pages and chunks
// (max < 0: none), leaving the rest of a batch for the next call; it
// reports whether anything releasable is left. Called with mu held.
func (m *Meta) releaseSome(max int) bool {
	n := 0
	for _, g := range m.grown {
		if g.tx > m.durable {
			break
		}
		m.dataSM.unholdRun(g.from, g.to) // no view can reach a chunk the old map lacked
		n++
	}
	m.grown = append(m.grown[:0], m.grown[n:]...)
	m.viewMu.Lock()
	limit := m.durable
	for vtx := range m.views {
		limit = min(limit, vtx)
	}
	m.viewMu.Unlock()
	n = 0
	done := 0
	for i := range m.deferred {
		b := &m.deferred[i]
		if b.tx > limit {
			break
		}
		for len(b.meta) > 0 && done != max {
			loc := b.meta[0]
			m.metaSM.unhold(loc)
			m.cache.drop(loc)
			b.meta = b.meta[1:]
			done++
		}
		for len(b.data) > 0 && done != max {
			m.dataSM.unhold(b.data[0])
			b.data = b.data[1:]
			done++
		}
		if done == max {
			break
		}
		n++
	}
	m.deferred = append(m.deferred[:0], m.deferred[n:]...)
	return done == max && len(m.deferred) > 0 && m.deferred[0].tx <= limit
}

// AllocData takes a free data chunk in the open transaction.
func (m *Meta) AllocData() (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return 0, err
	}
	loc, ok, err := m.dataSM.alloc()
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("meta: data space full (%d chunks): %w", m.dataSM.nbits, ErrNoSpace)
	}
	m.changed = true
	return loc, nil
}

// FreeData frees data chunk loc; it is not reused before this transaction
// is durable and every older view is released.
func (m *Meta) FreeData(loc uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if err := m.dataSM.mustBeSet(loc, "free"); err != nil {
		return err
	}
	m.dataSM.clear(loc) // read back by mustBeSet: no error
	m.dataSM.hold(loc)
	b := m.batch()
	b.data = append(b.data, loc)
	m.changed = true
	return nil
}

// Grow extends the metadata region to pages (the device must hold them).
func (m *Meta) Grow(pages uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if pages < m.metaSM.nbits {
		return fmt.Errorf("meta: grow to %d pages from %d: %w", pages, m.metaSM.nbits, ErrInvalid)
	}
	if len(m.extentsOf()) > 0 {
		// The extents' pages follow the base: it cannot grow in place.
		return fmt.Errorf("meta: grow a region that has extents in place: %w", ErrInvalid)
	}
	if err := checkGeometry(m.dev, pages, m.dataSM.nbits); err != nil {
		return err
	}
	m.layout.Store(&layout{base: pages})
	m.metaSM.grow(pages) // never paged out: no error
	m.changed = true
	return nil
}

// GrowData extends the data space map to chunks. With hold the new
// chunks are not allocated before the open transaction, which records the
// grown map, is durable and its frees are released (ReleaseFrees, or a
// Commit): a crash before then leaves the map as it was and nothing
// referencing them. Without hold they are free at once (Open's repair of
// a map that is smaller than what durable records already reference).
func (m *Meta) GrowData(chunks uint64, hold bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if chunks < m.dataSM.nbits {
		return fmt.Errorf("meta: grow data to %d chunks from %d: %w", chunks, m.dataSM.nbits, ErrInvalid)
	}
	// A region grown into data chunks (extents.go) has only its base
	// pages on m.dev; the extents take a superblock pointer each.
	base, ext := m.metaSM.nbits, m.extentsOf()
	if len(ext) > 0 {
		base = m.layout.Load().base
	}
	if err := checkGeometry(m.dev, base, chunks); err != nil {
		return err
	}
	if idxFor(pagesFor(m.metaSM.nbits))+idxFor(pagesFor(chunks))+len(ext) > maxIdxPtrs {
		return fmt.Errorf("meta: %d pages and %d chunks need more pointers than the superblock holds: %w", m.metaSM.nbits, chunks, ErrInvalid)
	}
	from := m.dataSM.nbits
	if err := m.dataSM.grow(chunks); err != nil {
		return err
	}
	if hold && chunks > from {
		m.dataSM.holdRun(from, chunks)
		m.grown = append(m.grown, grownRun{tx: m.tx, from: from, to: chunks})
	}
	m.changed = true
	return nil
}

// Space reports metadata pages and data chunks: total and in use.
// ChunksUsed counts ChunksMeta, the data chunks the region grew into.
type Space struct {
	Pages, PagesUsed   uint64
	Chunks, ChunksUsed uint64
	ChunksMeta         uint64
	// MapBytes is the memory the two space maps' bits take now (section 4
	// of docs/metadata.md: only their partly used pages, and the pages
	// with bits held).
	MapBytes uint64
	// MapPagedOut is the data map's bitmap pages paged out now; MapReads
	// those read back since Open, and MapWrites the dirty ones written to
	// be paged out (Options.MapBytes). MapLockedReads counts the pages
	// read with mu held (by the change that needed the page, or by
	// DataInUse), not ahead of it by ReadMapAhead.
	MapPagedOut, MapReads, MapWrites, MapLockedReads uint64
}

// Space reports the current transaction's space use.
func (m *Meta) Space() Space {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return Space{Pages: m.metaSM.nbits, PagesUsed: m.metaSM.nbits - m.metaSM.free(), Chunks: m.dataSM.nbits,
		ChunksUsed: m.dataSM.nbits - m.dataSM.free(), ChunksMeta: metaChunks(m.extentsOf()),
		MapBytes: m.dataSM.memBytes() + m.metaSM.memBytes(), MapPagedOut: uint64(m.dataSM.out), MapReads: m.dataSM.reads, MapWrites: m.dataSM.writes,
		MapLockedReads: m.mapLockedReads.Load()}
}

// CacheStats reports the node cache.
func (m *Meta) CacheStats() CacheStats { return m.cache.stats() }

// Close releases the Meta. It does not commit: what was not committed is
// lost, as after a crash (callers Commit first).
func (m *Meta) Close() error {
	m.commitMu.Lock() // a commit in flight ends first
	defer m.commitMu.Unlock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	m.closed = true
	m.mu.Unlock()
	if m.wbStop != nil {
		close(m.wbStop)
		<-m.wbDone
		m.wbMu.Lock()
		m.wbStopped = true
		for m.wbHelping > 0 { // a throttled writer's page write ends first
			m.wbCond.Wait()
		}
		m.wbCond.Broadcast()
		m.wbMu.Unlock()
	}
	return nil
}

// Stalls are what can hold up a writer inside the layer since the last
// ResetStalls (docs/metadata.md section 16): the lock's longest hold and
// wait, the slowest page read, the slowest write-back the writer did
// itself, and the most pages one change read.
type Stalls struct {
	Lock          lockstat.Stats
	MaxPageRead   time.Duration
	MaxSelfWrite  time.Duration
	MaxChangeMiss int64
	ChangesMissed uint64 // changes that read at least one page
	// MaxThrottle is the longest a writer waited in Throttle for the
	// write-back goroutine, Throttled how many times one waited.
	MaxThrottle time.Duration
	Throttled   uint64
	// Helped counts the pages throttled writers wrote themselves rather
	// than wait for the write-back goroutine.
	Helped uint64
	// LockedReads counts the pages read with the layer's lock held,
	// shared or exclusively (a lookup past its unlocked reads, a change's
	// own misses, replay's read-ahead): a change waits for each.
	LockedReads uint64
}

// Stalls reports the maxima since the last ResetStalls.
func (m *Meta) Stalls() Stalls {
	return Stalls{Lock: m.mu.Stats(), MaxPageRead: time.Duration(m.maxRead.Load()),
		MaxSelfWrite: time.Duration(m.maxSelfWrite.Load()), MaxChangeMiss: m.maxChangeMiss.Load(),
		ChangesMissed: m.changesMissed.Load(), MaxThrottle: time.Duration(m.maxThrottle.Load()),
		Throttled: m.throttled.Load(), Helped: m.wbHelped.Load(), LockedReads: m.lockedReads.Load()}
}

// ResetStalls clears what Stalls reports.
func (m *Meta) ResetStalls() {
	m.mu.Reset()
	m.maxRead.Reset()
	m.maxSelfWrite.Reset()
	m.maxChangeMiss.Reset()
	m.changesMissed.Store(0)
	m.maxThrottle.Reset()
	m.throttled.Store(0)
	m.wbHelped.Store(0)
	m.lockedReads.Store(0)
}
