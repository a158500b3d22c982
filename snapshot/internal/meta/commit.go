package meta

import (
	"fmt"
	"time"
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
	m.mu.Unlock()
	if err != nil || pages == nil {
		return err
	}
	m.cstats.Commits++
	m.cstats.WorstFreeze = max(m.cstats.WorstFreeze, frozen)
	m.cstats.Pages += uint64(len(locs))
	// T's nodes are immutable now (T+1 shadows them before any change),
	// so they are encoded without the lock.
	for i, n := range dirty {
		n.encode(pages[i*PageSize : (i+1)*PageSize])
	}
	m.wbMu.Lock() // a write-back batch encoded before the freeze lands first
	err = m.writeCommit(tx, pages, locs)
	m.wbMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	defer m.wbCond.Broadcast()
	if err != nil {
		return m.fail(err)
	}
	for _, n := range dirty {
		m.cache.setDirty(n, false)
	}
	m.frozenBytes = 0
	m.durable = tx
	m.publish(m.frozen)
	m.releaseFrees()
	m.cache.evict()
	return nil
}

// freeze ends the open transaction: it shadows the maps, encodes the
// space-map pages and the superblock (last) into commitBuf, leaving the
// first len(dirty) slots for the dirty nodes, and starts the next
// transaction. The frozen transaction's nodes stay dirty, so pinned in the
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
	n := len(dirty) + 1
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
	locs = make([]uint64, 0, n)
	next := func(loc uint64) []byte {
		p := pages[len(locs)*PageSize : (len(locs)+1)*PageSize]
		locs = append(locs, loc)
		return p
	}
	for _, nd := range dirty {
		next(nd.loc) // encoded by writeCommit, without the lock
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
		metaUsed: m.metaSM.used, dataUsed: m.dataSM.used, metaIdx: m.metaSM.idx, dataIdx: m.dataSM.idx, user: m.user}
	s.encode(next(tx % 2))
	m.frozen = m.snapshotState()
	m.tx++
	m.changed = false
	return tx, dirty, pages, locs, nil
}

// writeCommit writes a frozen transaction: its pages, a flush, the
// superblock (the last page), a flush. Callers hold commitMu, not mu.
func (m *Meta) writeCommit(tx uint64, pages []byte, locs []uint64) error {
	last := len(locs) - 1
	for i, loc := range locs[:last] {
		if err := m.writePage(pages[i*PageSize:(i+1)*PageSize], loc); err != nil {
			return err
		}
	}
	if err := m.dev.Flush(); err != nil {
		return fmt.Errorf("meta: commit %d: flush pages: %w", tx, err)
	}
	if err := m.writePage(pages[last*PageSize:], locs[last]); err != nil {
		return err
	}
	if err := m.dev.Flush(); err != nil {
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
				loc, err := m.allocPage()
				if err != nil {
					return err
				}
				if !sm.pages[i].isNil() {
					m.freePage(sm.pages[i].loc)
				}
				sm.pages[i] = ptr{loc: loc, tx: m.tx}
				sm.dirtyIndex[i/idxPerPage] = true
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

// Write-back keeps dirty nodes well below the cache size. Past half of
// the cache dirty, the writer wakes the write-back goroutine, which writes
// the open transaction's longest-dirty nodes in batches of wbBatch until a
// quarter is dirty; past three quarters, the writer waits for it. With
// Options.SyncWriteBack the writer writes a batch itself instead. Nodes of
// a commit in flight are left to the commit, which writes them anyway;
// while it runs they stay pinned, so the cache can pass its limit by up
// to one commit's nodes.
const wbBatch = 16

// writeBack runs at the end of each change, under mu. It runs between
// operations, never inside one, so no caller holds a node it might evict.
func (m *Meta) writeBack() error {
	if m.overlay {
		return nil // nothing is written: dirty nodes stay in memory (OpenOverlay)
	}
	soft, hard := m.cache.limit/2, m.cache.limit*3/4
	if m.wbKick == nil {
		return m.writeBackSync(soft, hard)
	}
	if m.openDirty() > soft {
		select {
		case m.wbKick <- struct{}{}:
		default:
		}
	}
	for m.openDirty() > hard && m.failed == nil && !m.closed {
		m.wbCond.Wait()
	}
	m.cache.evict()
	if m.failed != nil {
		return fmt.Errorf("%w: %w", ErrFailed, m.failed)
	}
	return nil
}

// openDirty is the dirty bytes of the open transaction: a commit's pinned
// nodes are its own to write, so they neither wake write-back nor make
// the writer wait. Callers hold mu.
func (m *Meta) openDirty() int { return max(0, m.cache.dirtyBytes()-m.frozenBytes) }

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
	batch := m.cache.dirtyNodesOf(m.tx, max)
	for _, n := range batch {
		n.encode(m.buf)
		if err := m.writePage(m.buf, n.loc); err != nil {
			return m.fail(err)
		}
		m.cache.setDirty(n, false)
	}
	m.cache.mu.Lock()
	m.cache.writeOut += uint64(len(batch))
	m.cache.mu.Unlock()
	m.cache.evict()
	return nil
}

// writeBackLoop is the write-back goroutine; Close stops it.
func (m *Meta) writeBackLoop() {
	defer close(m.wbDone)
	for {
		select {
		case <-m.wbStop:
			return
		case <-m.wbKick:
		}
		for m.writeBackBatch() {
			select {
			case <-m.wbStop:
				return
			default:
			}
		}
	}
}

// writeBackBatch encodes a batch of the open transaction's dirty nodes
// under mu, writes them without it, and marks clean those that did not
// change meanwhile. It reports whether more is due.
func (m *Meta) writeBackBatch() bool {
	m.wbMu.Lock()
	defer m.wbMu.Unlock()
	m.mu.Lock()
	if m.closed || m.failed != nil || m.openDirty() <= m.cache.limit/4 {
		m.mu.Unlock()
		return false
	}
	tx := m.tx
	batch := m.cache.dirtyNodesOf(tx, wbBatch)
	m.wbGens = m.wbGens[:0]
	for i, n := range batch {
		n.encode(m.wbBuf[i*PageSize : (i+1)*PageSize])
		m.wbGens = append(m.wbGens, n.gen)
	}
	m.mu.Unlock()
	if len(batch) == 0 {
		return false
	}
	var err error
	for i, n := range batch {
		if err = m.writePage(m.wbBuf[i*PageSize:(i+1)*PageSize], n.loc); err != nil {
			break
		}
	}
	m.mu.Lock()
	if err != nil {
		m.fail(err)
	} else {
		for i, n := range batch {
			if n.gen == m.wbGens[i] && n.tx == tx {
				m.cache.setDirty(n, false)
			}
		}
	}
	m.wbCond.Broadcast()
	m.mu.Unlock()
	m.cache.mu.Lock()
	m.cache.writeOut += uint64(len(batch))
	m.cache.mu.Unlock()
	m.cache.evict()
	return err == nil
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
