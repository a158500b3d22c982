package meta

import (
	"cmp"
	"fmt"
	"runtime"
	"slices"
	"time"

	"github.com/blocksnap/blocksnap/snapshot/internal/pace"
)

// Commit makes the open transaction durable (docs/metadata.md section 5).
// Under the write lock it shadows the changed space-map pages until
// nothing new is dirty, encodes the space-map pages and the superblock,
// and opens the next transaction. Then, without the lock, so that changes
// go on meanwhile in the next transaction, it encodes the transaction's
// nodes, writes the pages, flushes,
// writes the superblock copy for this transaction's parity and flushes
// again. Last, under the lock, it publishes the transaction to new Views
// and releases what durable transactions freed. Commits run one at a time.
func (m *Meta) Commit() error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.mu.Lock()
	t0 := time.Now()
	tx, dirty, pages, locs, err := m.freeze()
	frozen := time.Since(t0)
	queued := m.wbQueued
	m.mu.Unlock()
	if err != nil || pages == nil {
		return err
	}
	return m.writeFrozen(tx, dirty, pages, locs, queued, frozen, true, false)
}

// writeFrozen writes frozen transaction tx: it encodes its nodes (now
// immutable: T+1 shadows them before any change) without the lock, waits
// for the write-back pages queued before the freeze (queued), writes the
// pages, flushes, writes the superblock, flushes, and publishes tx.
// release also makes reusable what durable transactions freed; frozen is
// how long the freeze held the writer's lock, for CommitStats. Callers
// hold commitMu, not mu.
func (m *Meta) writeFrozen(tx uint64, dirty []*node, pages []byte, locs []uint64, queued uint64, frozen time.Duration, release, paced bool) error {
	m.cstats.Commits++
	m.cstats.WorstFreeze = max(m.cstats.WorstFreeze, frozen)
	m.cstats.Pages += uint64(len(locs))
	// The space-map pages a freeze encodes are few in a commit of a
	// running store, but all of them in the first commit after Format
	// or a Grow (3,400 pages, 13.7 MB, for a map of 112.5M data chunks):
	// a buffer past the batch's size is not kept for the next commit.
	defer func() {
		if cap(m.commitBuf) > commitBatch*PageSize {
			m.commitBuf = nil
		}
	}()
	// A write-back page encoded before the freeze may hold an older
	// version of one of T's pages: wait until every page queued before
	// the freeze is written, so the commit's version lands last. Pages
	// queued later are T+1's, which T neither writes nor reaches, so
	// write-back goes on during the commit's writes and flushes.
	err := m.waitWriteBack(queued)
	if err == nil {
		err = m.writeCommit(tx, dirty, pages, locs, paced)
	}
	m.mu.Lock()
	if paced {
		defer m.mu.UnlockYield()
	} else {
		defer m.mu.Unlock()
	}
	if err != nil {
		return m.fail(err)
	}
	for _, n := range dirty {
		m.cache.setDirty(n, false)
	}
	m.frozenBytes = 0
	m.frozenLeaves.Store(0)
	m.reapWriteBack()
	m.durable = tx
	m.dataSM.setDurable(tx)
	m.publish(m.frozen)
	if release {
		m.releaseFrees()
	}
	m.cache.evict()
	return nil
}

// freeze ends the open transaction: it shadows the maps, encodes the
// space-map pages and the superblock (last) into commitBuf, and starts the
// next transaction. locs lists the pages to write in order: the dirty
// nodes' (which writeCommit encodes, without the lock, in batches of
// commitBatch pages), then the space-map pages' and the superblock's, the
// pages in pages. The frozen transaction's nodes stay dirty, so pinned in the
// cache, until written; the next transaction shadows them before any
// change, as it does committed ones. Callers hold commitMu and mu. pages
// is nil when there is nothing to commit.
func (m *Meta) freeze() (tx uint64, dirty []*node, pages []byte, locs []uint64, err error) {
	if err := m.usable(); err != nil {
		return 0, nil, nil, nil, err
	}
	if !m.changed {
		return 0, nil, nil, nil, nil
	}
	if err := m.shadowMaps(); err != nil {
		return 0, nil, nil, nil, err
	}
	tx = m.tx
	dirty = m.cache.dirtyNodes(0)
	m.frozenBytes = m.cache.costOf(dirty)
	n := 1 // the superblock, then the dirty map pages
	for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
		for _, d := range sm.dirtyPage {
			if d {
				n++
			}
		}
		for _, d := range sm.dirtyIndex {
			if d {
				n++
			}
		}
	}
	if cap(m.commitBuf) < n*PageSize {
		m.commitBuf = make([]byte, n*PageSize)
	}
	pages = m.commitBuf[:n*PageSize]
	locs = make([]uint64, 0, len(dirty)+n)
	for _, nd := range dirty {
		locs = append(locs, nd.loc) // encoded by writeCommit, without the lock
	}
	next := func(loc uint64) []byte {
		i := len(locs) - len(dirty)
		locs = append(locs, loc)
		return pages[i*PageSize : (i+1)*PageSize]
	}
	for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
		for i, d := range sm.dirtyPage {
			if d {
				sm.encodeBitmap(next(sm.pages[i].loc), i, sm.pages[i].loc, tx)
			}
		}
		for j, d := range sm.dirtyIndex {
			if d {
				sm.encodeIndex(next(sm.idx[j].loc), j, sm.idx[j].loc, tx)
			}
		}
		clear(sm.dirtyPage)
		clear(sm.dirtyIndex)
	}
	s := super{tx: tx, pages: m.metaSM.nbits, dataChunks: m.dataSM.nbits,
		chunkRoot: m.chunk.root, epochRoot: m.epoch.root, chunkLevel: m.chunk.level, epochLevel: m.epoch.level,
		keys: m.keys, chunkRuns: m.chunk.runs, epochRuns: m.epoch.runs,
		metaUsed: m.metaSM.used, dataUsed: m.dataSM.used, metaIdx: m.metaSM.idx, dataIdx: m.dataSM.idx, user: m.user,
		ext: m.extentsOf()}
	s.encode(next(tx % 2))
	m.frozen = m.snapshotState()
	m.frozenLeaves.Store(m.txLeaves.Swap(0))
	m.tx++
	m.changed = false
	return tx, dirty, pages, locs, nil
}

// commitBatch is the number of nodes a commit encodes before it writes
// them: the commit's write buffer (commitMu guards it) is commitBatch
// pages, whatever the commit's size. Holding every encoded page of a
// commit until its writes kept about a quarter of the cache's size in
// page buffers after each large commit (docs/metadata.md section 22).
const commitBatch = 64

// writeCommit writes a frozen transaction: its dirty nodes, encoded
// commitBatch at a time (they are immutable now: the next transaction
// shadows them before any change), then its space-map pages (pages, all
// but the last), a flush, the superblock (the last page of pages), a
// flush. Callers hold commitMu, not mu.
func (m *Meta) writeCommit(tx uint64, dirty []*node, pages []byte, locs []uint64, paced bool) error {
	if len(m.commitBatch) < commitBatch*PageSize && len(dirty) > 0 {
		m.commitBatch = make([]byte, commitBatch*PageSize)
	}
	// A paced commit (Frozen.WritePaced) yields during its encoding and
	// page writes and as it releases mu, to a writer it may have woken.
	var p pace.Pacer
	step, unlock := func() {}, m.mu.Unlock
	if paced {
		step, unlock = p.Step, m.mu.UnlockYield
	}
	// In page order, so that the nodes of consecutive pages (the
	// allocator hands out pages in order as nodes are shadowed) are
	// written with one call: a commit of a random fill past the cache
	// writes thousands of pages.
	slices.SortFunc(dirty, func(a, b *node) int { return cmp.Compare(a.loc, b.loc) })
	for i := 0; i < len(dirty); i += commitBatch {
		batch := dirty[i:min(i+commitBatch, len(dirty))]
		for j, n := range batch {
			n.encode(m.commitBatch[j*PageSize : (j+1)*PageSize])
			step()
		}
		for j := 0; j < len(batch); {
			k := j + 1
			for k < len(batch) && batch[k].loc == batch[k-1].loc+1 {
				k++
			}
			if err := m.writePages(m.commitBatch[j*PageSize:k*PageSize], batch[j].loc); err != nil {
				return err
			}
			for range k - j {
				step()
			}
			j = k
		}
		// Written, so no longer pinned: a clean node evicted now is read
		// back from its page (as after write-back, before any flush), and
		// the open transaction gets back the room the batch took
		// (dirtyBounds). Nothing changes these nodes: the open
		// transaction shadows them first.
		m.mu.Lock()
		for _, n := range batch {
			m.cache.setDirty(n, false)
		}
		m.frozenBytes = max(0, m.frozenBytes-m.cache.costOf(batch))
		unlock()
	}
	locs = locs[len(dirty):]
	last := len(locs) - 1
	for i, loc := range locs[:last] {
		if err := m.writePage(pages[i*PageSize:(i+1)*PageSize], loc); err != nil {
			return err
		}
	}
	if err := m.flushDev(); err != nil {
		return fmt.Errorf("meta: commit %d: flush pages: %w", tx, err)
	}
	if err := m.writePage(pages[last*PageSize:], locs[last]); err != nil {
		return err
	}
	if err := m.flushDev(); err != nil {
		return fmt.Errorf("meta: commit %d: flush superblock: %w", tx, err)
	}
	return nil
}

// shadowMaps gives every changed bitmap page, and the index pages that
// list them, a new page in this transaction. Allocating those pages
// changes the metadata map again, so it repeats until nothing new is
// dirty; each page is shadowed at most once per transaction, so it ends.
func (m *Meta) shadowMaps() error {
	for {
		progress := false
		for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
			for i, d := range sm.dirtyPage {
				if !d || sm.pages[i].tx == m.tx {
					continue
				}
				if err := m.shadowMapPage(sm, i); err != nil {
					return err
				}
				progress = true
			}
			for j, d := range sm.dirtyIndex {
				if !d || sm.idx[j].tx == m.tx {
					continue
				}
				loc, err := m.allocPage()
				if err != nil {
					return err
				}
				if !sm.idx[j].isNil() {
					m.freePage(sm.idx[j].loc)
				}
				sm.idx[j] = ptr{loc: loc, tx: m.tx}
				progress = true
			}
		}
		if !progress {
			return nil
		}
	}
}

// shadowMapPage gives bitmap page i of sm a new page in the open
// transaction, freeing (holding) the one it had, and dirties the index
// page that lists it.
func (m *Meta) shadowMapPage(sm *spaceMap, i int) error {
	loc, err := m.allocPage()
	if err != nil {
		return err
	}
	if !sm.pages[i].isNil() {
		m.freePage(sm.pages[i].loc)
	}
	sm.pages[i] = ptr{loc: loc, tx: m.tx}
	sm.dirtyIndex[i/idxPerPage] = true
	return nil
}

// Write-back keeps dirty nodes well below the cache size, and the writer
// never waits for another goroutine to do it (docs/metadata.md section
// 5). Past half of the cache dirty, each change copies one to
// wbPerChange (in proportion to the excess) of the open transaction's
// longest-dirty nodes into free slots and queues them to the write-back
// goroutine, which encodes and writes them. It takes no lock but wbMu, so the
// writer never waits for it, and its page writes, which the kernel may
// hold behind a commit's flush of the same file, stay out of the
// writer's calls. The next change reaps the written slots and marks clean
// the nodes that did not change meanwhile. Past three quarters with every
// slot in flight, the writer writes up to wbPerChange nodes itself. With
// Options.SyncWriteBack the writer writes a batch of wbBatch itself from
// half (four past three quarters), so that a seed replays the same device
// calls. Nodes of a commit in flight are left to the commit, which writes
// them anyway; while it runs they stay pinned. So that they do not take
// the cache past its limit, the open transaction's half and three
// quarters are of what the commit in flight leaves (dirtyBounds): the
// dirty nodes of both together stay under the limit, and eviction keeps
// the clean ones within what is left (docs/metadata.md section 22).
const (
	wbBatch     = 16
	wbPerChange = 4
	wbMaxSlots  = 64
	// wbSlotCost bounds the cache cost of a node queued for write-back
	// (a full leaf of the shortest runs), to size the slots so that the
	// nodes in flight, which neither the writer nor eviction can touch,
	// fit in the quarter of the cache above the hard limit.
	wbSlotCost = nodeOverhead + 32*(leafCap/4+2)
)

// wbSlotsFor is the number of write-back slots for a cache of limit bytes.
func wbSlotsFor(limit int) int { return min(max(limit/4/wbSlotCost, 1), wbMaxSlots) }

// wbSlot is one page queued to the write-back goroutine. The writer fills
// it under mu and sends its index on wbQueue; the goroutine writes it,
// sets err and sends the index back on wbReaped (the channels order the
// accesses).
type wbSlot struct {
	n   *node
	gen uint64 // n.gen when copied: a change since means still dirty
	tx  uint64
	loc uint64
	// The node as it was when queued: the goroutine encodes it into buf.
	// The writer copies the runs (a memmove) rather than encoding them
	// under its lock: encoding a full leaf costs ten times the copy, and
	// with a tree larger than the cache nearly every change queues one.
	kind  kind
	level uint16
	runs  []run
	kids  []ptr
	buf   []byte
	err   error
}

// writeBack runs at the end of each change, under mu. It runs between
// operations, never inside one, so no caller holds a node it might evict.
func (m *Meta) writeBack() error {
	if m.overlay {
		return nil // nothing is written: dirty nodes stay in memory (OpenOverlay)
	}
	if m.wbQueue == nil {
		soft, hard := m.cache.limit/2, m.cache.limit*3/4
		return m.writeBackSync(soft, hard)
	}
	soft, hard := m.dirtyBounds()
	m.reapWriteBack()
	if m.failed != nil { // a queued page failed: the transaction is lost
		return fmt.Errorf("%w: %w", ErrFailed, m.failed)
	}
	if d := m.openDirty(); d > soft {
		// In proportion to the excess: one node a change just past half,
		// up to wbPerChange at three quarters, so write-back keeps pace
		// with the changes at the least cost to each.
		k := wbPerChange
		if hard > soft {
			k = min(1+(wbPerChange-1)*(d-soft)/(hard-soft), wbPerChange)
		}
		queued := m.queueWriteBack(k)
		if d > hard {
			// Past the hard bound the writer does not write here, under
			// mu and its caller's locks (docs/metadata.md section 16): it
			// flags the excess, and its caller waits in Throttle, without
			// its locks, before its next change, writing queued pages
			// itself until the dirty nodes are back under the bound. It
			// flags it even with slots free: the nodes in flight are
			// dirty until written, and with write-back behind (a slow
			// device, a loaded machine) a writer that only queued went
			// on dirtying past the bound by the slots' worth, and with a
			// large commit in flight past the cache's limit. Only a
			// caller that does not throttle (replay, the store's
			// collector, a large record) and lets the dirty nodes pass
			// seven eighths of what the commit in flight leaves of the
			// cache, with every slot in flight, writes some itself, so
			// that they stay bounded.
			m.overHard.Store(true)
			if queued == 0 && d > hard+(hard-soft)/2 {
				if err := m.writeNodes(wbPerChange); err != nil {
					return err
				}
			}
		}
	}
	m.cache.evict()
	return nil
}

// Throttle waits, with no lock held, while the open transaction's dirty
// nodes are past three quarters of the cache with every write-back slot
// in flight: for the goroutine to write a slot, then takes the written
// slots back and queues more. A writer that changes the layer under a lock
// of its own calls it before it takes that lock, so that it never writes
// back, nor waits for write-back, while holding it (docs/metadata.md
// section 16). It is one atomic load when write-back keeps up.
func (m *Meta) Throttle() error {
	if !m.overHard.Load() {
		return nil
	}
	t0 := time.Now()
	err := m.throttle()
	m.maxThrottle.Note(int64(time.Since(t0)))
	return err
}

// throttle is Throttle's wait, once write-back has fallen behind.
func (m *Meta) throttle() error {
	waited := false
	defer func() {
		if waited {
			m.throttled.Add(1)
		}
	}()
	for m.overHard.Load() {
		m.mu.Lock()
		if err := m.usable(); err != nil {
			m.overHard.Store(false)
			m.mu.Unlock()
			return err
		}
		m.reapWriteBack()
		soft, hard := m.dirtyBounds()
		d := m.openDirty()
		if d > soft {
			m.queueWriteBack(wbPerChange)
		}
		over := d > hard
		if over && len(m.wbFree) == len(m.wbSlot) {
			// Nothing in flight and nothing queued: no dirty node of the
			// open transaction is left to write (the excess is a
			// commit's). Waiting would not help.
			over = false
		}
		m.overHard.Store(over)
		queued := m.wbQueued
		m.mu.Unlock()
		if !over {
			return nil
		}
		waited = true
		// Write a queued page itself rather than wait for the goroutine
		// to get to it: the writer holds no lock here and has the CPU,
		// which the goroutine, on a loaded machine, may not.
		if m.helpWriteBack() {
			continue
		}
		// Every queued page is being written: wait for one more written,
		// of those queued by now (Close stops the goroutine and wakes
		// this: usable then says closed).
		m.wbMu.Lock()
		w := m.wbWritten
		m.wbWaiting++
		for m.wbWritten == w && w < queued && m.wbErr == nil && !m.wbStopped {
			m.wbCond.Wait()
		}
		m.wbWaiting--
		err := m.wbErr
		m.wbMu.Unlock()
		if err != nil {
			return fmt.Errorf("%w: %w", ErrFailed, err)
		}
	}
	return nil
}

// dirtyBounds returns the open transaction's dirty bytes past which a
// change queues write-back (soft) and past which the writer throttles
// (hard): half and three quarters of the cache, less the nodes the
// commit in flight still pins (frozenBytes, which falls as it writes
// them). So the dirty nodes of both stay under three quarters of the
// limit, and with the write-back slots in flight (a quarter) under the
// limit: before, the open transaction had half and three quarters of
// the whole limit to itself, and a large commit in flight took the cache
// past its limit by up to its own size. Callers hold mu.
func (m *Meta) dirtyBounds() (soft, hard int) {
	return max(0, m.cache.limit/2-m.frozenBytes), max(0, m.cache.limit*3/4-m.frozenBytes)
}

// openDirty is the dirty bytes of the open transaction: a commit's pinned
// nodes are its own to write, so they neither start write-back nor count
// towards the writer's limit. Callers hold mu.
func (m *Meta) openDirty() int { return max(0, m.cache.dirtyBytes()-m.frozenBytes) }

// queueWriteBack copies up to most of the open transaction's
// longest-dirty nodes that are not in flight into free slots, marks them
// in flight and queues them. It returns how many it queued. Callers hold
// mu.
func (m *Meta) queueWriteBack(most int) int {
	most = min(most, len(m.wbFree))
	if most == 0 {
		return 0
	}
	m.nodeBuf = m.cache.dirtyNodesOf(m.nodeBuf[:0], m.tx, most)
	for _, n := range m.nodeBuf {
		i := m.wbFree[len(m.wbFree)-1]
		m.wbFree = m.wbFree[:len(m.wbFree)-1]
		s := &m.wbSlot[i]
		if cap(s.runs) < len(n.runs) {
			// Sized to the node, up to a full leaf of the shortest runs,
			// not by append's doubling: the copies are heap outside the
			// cache, at most wbMaxSlots*wbSlotCost (2 MiB) in all.
			s.runs = make([]run, 0, max(len(n.runs), min(len(n.runs)*5/4, leafCap/4+2)))
		}
		s.runs = append(s.runs[:0], n.runs...)
		s.kids = append(s.kids[:0], n.kids...)
		s.kind, s.level = n.kind, n.level
		n.wbBusy = true
		s.n, s.gen, s.tx, s.loc, s.err = n, n.gen, m.tx, n.loc, nil
		m.wbSeq[i].Store(m.wbQueued + 1)
		m.wbQueued++
		m.notePageWrite(n.loc)
		m.wbQueue <- i // never blocks: it has room for every slot
	}
	q := len(m.nodeBuf)
	clear(m.nodeBuf) // keep no node alive past its eviction
	return q
}

// openWriteRing is how many of the open transaction's last page writes
// openWriteLocs keeps: a lookup's unlocked read of such a page over which
// more were queued (a few per change past half the cache dirty) is not
// used, and the page is read again.
const openWriteRing = 256

// notePageWrite records a write of the open transaction's page loc,
// queued or made by the writer (openUnwritten). Callers hold mu
// exclusively.
func (m *Meta) notePageWrite(loc uint64) {
	m.openWriteLocs[m.openWrites%openWriteRing] = loc
	m.openWrites++
}

// reapWriteBack takes back the slots the goroutine (or a throttled
// writer) has written: a node that did not change since it was copied is
// clean now. A failed write
// fails the Meta. Callers hold mu.
func (m *Meta) reapWriteBack() {
	for {
		select {
		case i := <-m.wbReaped:
			s := &m.wbSlot[i]
			s.n.wbBusy = false
			if s.err != nil {
				m.fail(s.err)
			} else if s.n.gen == s.gen && s.n.tx == s.tx {
				m.cache.setDirty(s.n, false)
			}
			s.n = nil
			m.wbFree = append(m.wbFree, i)
		default:
			return
		}
	}
}

// waitWriteBack waits until every page whose queue number is below
// queued (wbQueued at the caller's freeze) is written, and returns the
// first write error. Callers hold commitMu, not mu.
func (m *Meta) waitWriteBack(queued uint64) error {
	if m.wbQueue == nil {
		return nil
	}
	m.wbMu.Lock()
	defer m.wbMu.Unlock()
	for m.wbPending(queued) && m.wbErr == nil && !m.wbStopped {
		m.wbCond.Wait()
	}
	if m.wbErr == nil && m.wbPending(queued) {
		return ErrClosed // Close stopped write-back (it waits for commits: not reached)
	}
	return m.wbErr
}

// wbPending reports whether a page queued before sequence number queued
// is still queued or being written.
func (m *Meta) wbPending(queued uint64) bool {
	for i := range m.wbSeq {
		if v := m.wbSeq[i].Load(); v != 0 && v-1 < queued {
			return true
		}
	}
	return false
}

// helpWriteBack writes one queued slot in a throttled writer's call, as
// the goroutine would, if one is queued and Close has not stopped
// write-back; it reports whether it wrote one.
func (m *Meta) helpWriteBack() bool {
	m.wbMu.Lock()
	if m.wbStopped {
		m.wbMu.Unlock()
		return false
	}
	m.wbHelping++
	m.wbMu.Unlock()
	helped := false
	select {
	case i := <-m.wbQueue:
		m.writeSlot(i)
		m.wbHelped.Add(1)
		helped = true
	default:
	}
	m.wbMu.Lock()
	m.wbHelping--
	m.wbCond.Broadcast()
	m.wbMu.Unlock()
	return helped
}

// writeBackSync writes one batch in the writer's call (four past hard).
func (m *Meta) writeBackSync(soft, hard int) error {
	d := m.cache.dirtyBytes()
	if d <= soft {
		m.cache.evict()
		return nil
	}
	max := wbBatch
	if d > hard {
		max *= 4
	}
	if err := m.writeNodes(max); err != nil {
		return err
	}
	m.cache.evict()
	return nil
}

// writeNodes writes up to max of the open transaction's longest-dirty
// nodes in the writer's call and marks them clean: they cannot change
// meanwhile, since the caller holds mu. Nodes in flight in the write-back
// goroutine are skipped, so no page is written twice at once (an older
// version landing last). Callers hold mu.
func (m *Meta) writeNodes(max int) error {
	t0 := time.Now()
	defer func() { m.maxSelfWrite.Note(int64(time.Since(t0))) }()
	m.nodeBuf = m.cache.dirtyNodesOf(m.nodeBuf[:0], m.tx, max)
	for _, n := range m.nodeBuf {
		n.encode(m.buf)
		m.notePageWrite(n.loc)
		if err := m.writePage(m.buf, n.loc); err != nil {
			return m.fail(err)
		}
		m.cache.setDirty(n, false)
	}
	m.cache.wrote(len(m.nodeBuf))
	clear(m.nodeBuf) // keep no node alive past its eviction
	return nil
}

// writeBackLoop is the write-back goroutine: it writes the queued slots
// in order. It takes no lock but wbMu, so the writer never waits for it.
// Close stops it.
func (m *Meta) writeBackLoop() {
	defer close(m.wbDone)
	var p pace.Pacer // a full queue is up to 64 pages of encoding and writing
	for {
		select {
		case <-m.wbStop:
			return
		case i := <-m.wbQueue:
			if m.writeSlot(i) {
				// A throttled writer was woken to run next on this
				// processor, where it would wait for the rest of the
				// queue to be written (package pace says why).
				runtime.Gosched()
				continue
			}
			p.Step()
		}
	}
}

// writeSlot encodes and writes queued slot i and hands it back: the
// goroutine's work, which a throttled writer also does (helpWriteBack).
// It reports whether a throttled writer was waiting for a page written.
func (m *Meta) writeSlot(i int) (woke bool) {
	s := &m.wbSlot[i]
	encodeNode(s.buf, s.kind, s.loc, s.tx, s.level, s.runs, s.kids)
	s.err = m.writePage(s.buf, s.loc)
	if s.err == nil {
		m.cache.wrote(1)
	}
	m.wbSeq[i].Store(0)
	m.wbMu.Lock()
	m.wbWritten++
	if s.err != nil && m.wbErr == nil {
		m.wbErr = s.err
	}
	m.wbCond.Broadcast()
	woke = m.wbWaiting > 0
	m.wbMu.Unlock()
	m.wbReaped <- i // never blocks: it has room for every slot
	return woke
}

// lowSpace returns the callback to run (after unlocking), if the free
// metadata pages just crossed below the threshold.
func (m *Meta) lowSpace() func() {
	if m.opts.LowSpace == nil {
		return nil
	}
	free := m.metaSM.free()
	if free >= m.opts.LowSpaceThreshold {
		m.lowFired = false
		return nil
	}
	if m.lowFired {
		return nil
	}
	m.lowFired = true
	cb, total := m.opts.LowSpace, m.metaSM.nbits
	return func() { cb(free, total) }
}

// CommitStats describes the commits so far.
type CommitStats struct {
	Commits uint64
	Pages   uint64 // pages written by commits (write-back not included)
	// WorstFreeze is the longest a commit held the writer's lock.
	WorstFreeze time.Duration
}

// CommitStats reports the commits since Open.
func (m *Meta) CommitStats() CommitStats {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	return m.cstats
}
