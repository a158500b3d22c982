package meta

import "fmt"

// Commit makes the open transaction durable (docs/metadata.md section 5):
// shadow the changed space-map pages until nothing new is dirty, write
// every dirty page, flush, write the older superblock copy, flush, then
// release what committed transactions freed.
func (m *Meta) Commit() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if !m.changed {
		return nil
	}
	if err := m.shadowMaps(); err != nil {
		return err
	}
	dirty := m.cache.dirtyNodes(0)
	for _, n := range dirty {
		n.encode(m.buf)
		if err := m.writePage(m.buf, n.loc); err != nil {
			return m.fail(err)
		}
	}
	for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
		for i, d := range sm.dirtyPage {
			if d {
				sm.encodeBitmap(m.buf, i, sm.pages[i].loc, m.tx)
				if err := m.writePage(m.buf, sm.pages[i].loc); err != nil {
					return m.fail(err)
				}
			}
		}
		for j, d := range sm.dirtyIndex {
			if d {
				sm.encodeIndex(m.buf, j, sm.idx[j].loc, m.tx)
				if err := m.writePage(m.buf, sm.idx[j].loc); err != nil {
					return m.fail(err)
				}
			}
		}
	}
	if err := m.dev.Flush(); err != nil {
		return m.fail(fmt.Errorf("meta: commit %d: flush pages: %w", m.tx, err))
	}
	s := super{tx: m.tx, pages: m.metaSM.nbits, dataChunks: m.dataSM.nbits,
		chunkRoot: m.chunk.root, epochRoot: m.epoch.root, chunkLevel: m.chunk.level, epochLevel: m.epoch.level,
		keys: m.keys, chunkRuns: m.chunk.runs, epochRuns: m.epoch.runs,
		metaUsed: m.metaSM.used, dataUsed: m.dataSM.used, metaIdx: m.metaSM.idx, dataIdx: m.dataSM.idx}
	s.encode(m.buf)
	if err := m.writePage(m.buf, m.tx%2); err != nil {
		return m.fail(err)
	}
	if err := m.dev.Flush(); err != nil {
		return m.fail(fmt.Errorf("meta: commit %d: flush superblock: %w", m.tx, err))
	}
	for _, n := range dirty {
		m.cache.setDirty(n, false)
	}
	for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
		clear(sm.dirtyPage)
		clear(sm.dirtyIndex)
	}
	m.tx++
	m.changed = false
	m.publish()
	m.releaseFrees()
	m.cache.evict()
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

// dirtyLimit is the dirty-node byte count at which the writer starts
// writing back.
func (m *Meta) dirtyLimit() int { return min(m.cache.limit/4, 1024*PageSize*4) }

// writeBack writes the coldest dirty nodes of the open transaction to
// their (new, unreferenced) pages until the dirty bytes are at half the
// limit. It runs between operations, never inside one, so no caller holds
// a node it might evict.
func (m *Meta) writeBack() error {
	limit := m.dirtyLimit()
	if m.cache.dirtyBytes() <= limit {
		m.cache.evict()
		return nil
	}
	for m.cache.dirtyBytes() > limit/2 {
		batch := m.cache.dirtyNodes(64)
		if len(batch) == 0 {
			break
		}
		for _, n := range batch {
			n.encode(m.buf)
			if err := m.writePage(m.buf, n.loc); err != nil {
				return m.fail(err)
			}
			m.cache.setDirty(n, false)
			m.cache.mu.Lock()
			m.cache.writeOut++
			m.cache.mu.Unlock()
		}
	}
	m.cache.evict()
	return nil
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
