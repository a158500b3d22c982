package meta

import (
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// What the snapshot store needs beyond Commit: a commit split in two so
// that the store can freeze the transaction under its own lock (at a
// journal record boundary) and write it without that lock; a user word in
// the superblock for the journal position a commit covers; data chunks
// allocated for copies still in flight kept out of a commit; claiming a
// given chunk when the journal is replayed; and a space check for a whole
// journal record before any of it is applied.

// Frozen is a transaction ended by Freeze and not yet written. Until Write
// (or Abandon) returns, no other commit can start.
type Frozen struct {
	m      *Meta
	tx     uint64
	dirty  []*node
	pages  []byte
	locs   []uint64
	queued uint64 // write-back pages queued before the freeze
	frozen time.Duration
}

// Freeze ends the open transaction as Commit does and returns it for
// Write. user is recorded in its superblock (User reads it back after
// Open). The data chunks in inflight, allocated by AllocData but not yet
// referenced by any key, are shown free in the frozen transaction's map
// and stay allocated in the next one, so a crash after the commit leaks
// none of them. A nil Frozen means there was nothing to commit.
func (m *Meta) Freeze(user uint64, inflight []uint64) (*Frozen, error) {
	m.commitMu.Lock()
	m.mu.Lock()
	if m.overlay {
		m.mu.Unlock()
		m.commitMu.Unlock()
		return nil, ErrReadOnly
	}
	for i, loc := range inflight {
		if err := m.dataSM.mustBeSet(loc, "freeze in flight"); err != nil {
			for _, l := range inflight[:i] {
				m.restoreBit(l, true)
			}
			m.mu.Unlock()
			m.commitMu.Unlock()
			return nil, fmt.Errorf("meta: freeze: %w", err)
		}
		m.dataSM.clear(loc) // read back by mustBeSet: no error
	}
	if user != m.user {
		m.user = user
		m.changed = true
	}
	t0 := time.Now()
	tx, dirty, pages, locs, err := m.freeze()
	frozen := time.Since(t0)
	// The next transaction holds them again, without being marked changed
	// for it: on disk they are meant to be free, and the put that adopts
	// one marks its transaction. (Marked, a store whose allocator always
	// holds some in flight wrote a tree commit at every capture.)
	for _, loc := range inflight {
		m.restoreBit(loc, true) // on a failure the open transaction is lost; the frozen one is whole
	}
	queued := m.wbQueued
	m.mu.Unlock()
	if err != nil || pages == nil {
		m.commitMu.Unlock()
		return nil, err
	}
	return &Frozen{m: m, tx: tx, dirty: dirty, pages: pages, locs: locs, queued: queued, frozen: frozen}, nil
}

// Write writes the frozen transaction (pages, flush, superblock, flush)
// and publishes it to new Views. Unlike Commit it does not release what
// durable transactions freed: the caller does that with ReleaseFrees,
// under whatever lock keeps its readers off reused data chunks.
func (f *Frozen) Write() error {
	m := f.m
	defer m.commitMu.Unlock()
	return m.writeFrozen(f.tx, f.dirty, f.pages, f.locs, f.queued, f.frozen, false, false)
}

// WritePaced is Write for a goroutine that is not the store's writer (a
// background or admin tree commit): it yields the processor during the
// encoding and page writes (package pace) and as it releases mu to a
// goroutine waiting for it (lockstat's UnlockYield). A commit written by
// the writer itself, under its locks, uses Write.
func (f *Frozen) WritePaced() error {
	m := f.m
	defer m.commitMu.Unlock()
	return m.writeFrozen(f.tx, f.dirty, f.pages, f.locs, f.queued, f.frozen, false, true)
}

// Abandon gives up a frozen transaction without writing it. The Meta
// fails (its open transaction builds on the frozen one): reopen to
// recover from the last commit.
func (f *Frozen) Abandon(cause error) {
	m := f.m
	m.mu.Lock()
	m.fail(fmt.Errorf("meta: commit %d abandoned: %w", f.tx, cause))
	m.mu.Unlock()
	m.commitMu.Unlock()
}

// ReleaseFrees makes reusable what durable transactions freed (after
// Frozen.Write).
//
// It releases them in steps (ReleaseFreesStep), letting mu go between.
func (m *Meta) ReleaseFrees() {
	for m.ReleaseFreesStep() {
	}
}

// ReleaseFreesStep is one step of ReleaseFrees: it releases up to
// releaseStep pages and chunks under one hold of mu, and reports whether
// more are releasable now. A tree commit that shadowed a large tree frees
// tens of thousands of pages; releasing them in one hold held the writer
// up for 1-4 ms.
func (m *Meta) ReleaseFreesStep() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.releaseSome(releaseStep)
}

// releaseStep is how many pages and chunks ReleaseFreesStep releases.
const releaseStep = 2048

// User returns the user word of the open transaction: after Open, the
// one the last durable commit recorded.
func (m *Meta) User() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.user
}

// MarkData claims data chunk loc in the open transaction (a replayed
// journal record that references it). ErrInvalid if it is out of range,
// already in use or held.
func (m *Meta) MarkData(loc uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if loc >= m.dataSM.nbits || m.dataSM.isHeld(loc) {
		return fmt.Errorf("meta: claim of data chunk %d, out of range or in use: %w", loc, ErrInvalid)
	}
	if set, err := m.dataSM.isSet(loc); err != nil {
		return err
	} else if set {
		return fmt.Errorf("meta: claim of data chunk %d, out of range or in use: %w", loc, ErrInvalid)
	}
	m.dataSM.set(loc) // read back by isSet: no error
	m.changed = true
	return nil
}

// Room reports ErrNoSpace, changing nothing, unless the metadata region
// has room for changes key changes (puts and deletes) in the open
// transaction, in the worst case, plus what the commit needs. With
// isDelete the changes may use the delete reserve.
//
// Room only reads the space map's counts, so it holds mu shared, and
// untimed (lockstat's RLockShort): the store calls it under Store.mu for
// every record, and an exclusive, timed hold cost two clock reads there,
// for an O(1) check. Its wait for mu is still measured.
func (m *Meta) Room(changes int, isDelete bool) error {
	m.mu.RLockShort()
	defer m.mu.RUnlockShort()
	if err := m.usable(); err != nil {
		return err
	}
	// One change more than asked: each change checks a whole change's
	// worst case for itself (room), so the last of them must still find
	// that much after the others took theirs.
	return m.roomFor(changes+1, isDelete)
}

// roomFor is Room with m.mu held. The worst case for k changes in one
// transaction: each node is shadowed at most once per transaction, so
// shadows are at most the pages in use (and at most k paths); a leaf
// split leaves both halves about half empty, and a change adds at most
// two runs of at most 40 bytes, so a leaf splits at most once per 16
// changes after its first split: leaf splits are at most the leaves (the
// pages in use) plus k/16 per tree, and never more than k; a branch
// splits once per 63 leaf splits below it, plus one per level and a new
// root.
func (m *Meta) roomFor(changes int, isDelete bool) error {
	k := uint64(max(changes, 1))
	lc, le := uint64(m.chunk.level), uint64(m.epoch.level)
	used := m.metaSM.used
	need := min(k*(lc+le+2), used) + 2*min(k, used+k/16+1) + 2*(k/16+1) + lc + le + 4
	for _, sm := range []*spaceMap{m.metaSM, m.dataSM} {
		need += uint64(len(sm.pages) + len(sm.idx))
	}
	need += 8
	if !isDelete {
		need += max(64, m.metaSM.nbits/100)
	}
	if free := m.metaSM.free(); free < need {
		return fmt.Errorf("meta: %d metadata pages free, %d changes may need %d: %w", free, changes, need, ErrNoSpace)
	}
	return nil
}

// OpenOverlay opens a region that is never written, like a ReadOnly
// Open, but that accepts changes in memory: a read-only store replays its
// journal tail into it. Its dirty nodes are never written back or
// evicted, so its memory grows with the changes (the tail is bounded);
// Freeze and Commit fail with ErrReadOnly.
func OpenOverlay(dev blockdev.Device, opts Options) (*Meta, error) {
	opts.ReadOnly, opts.SyncWriteBack = false, true // no write-back goroutine
	return open(dev, opts, true)
}

// AllocDataBatch appends to dst up to want free data chunks (at least
// one), taken in the open transaction in the order of the map's cursor:
// consecutive locations while the free space is. ErrNoSpace when no chunk
// is free (DataHeld tells whether a commit would free some).
func (m *Meta) AllocDataBatch(dst []uint64, want int) ([]uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return dst, err
	}
	sm := m.dataSM
	for n := 0; n < want; n++ {
		loc, ok, err := sm.alloc()
		if err != nil {
			if n == 0 {
				return dst, err
			}
			break // what it has; the next call meets the error
		}
		if !ok {
			if n == 0 {
				return dst, fmt.Errorf("meta: data space full (%d chunks): %w", sm.nbits, ErrNoSpace)
			}
			break
		}
		dst = append(dst, loc)
	}
	m.changed = true
	return dst, nil
}

// ReturnData gives back a data chunk that AllocData or AllocDataBatch took
// and that no key ever referenced: it is free at once (no commit can need
// it: Freeze kept it out as in flight).
func (m *Meta) ReturnData(loc uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	if err := m.dataSM.mustBeSet(loc, "return"); err != nil {
		return err
	}
	m.dataSM.clear(loc) // read back by mustBeSet: no error
	m.changed = true
	return nil
}

// DataHeld is the number of data chunks freed, or added by GrowData with
// hold, but not reusable yet.
func (m *Meta) DataHeld() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.dataSM.nheld
}

// DataInUse calls fn, under the layer's lock (fn must not call the
// Meta), for every data chunk allocated in the open transaction, in
// order, until fn returns false. The chunks the region grew into
// (GrowFromData) are not data: they are left out. Paged-out pages of the
// map are read, and left paged out; an error is a failed read.
func (m *Meta) DataInUse(fn func(loc uint64) bool) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	ext := m.extentsOf()
	sm := m.dataSM
	raw, buf := make([]byte, PageSize), new(bitPage)
	var p *bitPage
	for w := range (sm.nbits + 63) / 64 {
		if w%wordsPerPage == 0 {
			var err error
			if p, err = sm.peek(w/wordsPerPage, raw, buf); err != nil {
				return err
			}
		}
		word := p[w%wordsPerPage]
		for word != 0 {
			b := uint64(bits.TrailingZeros64(word))
			word &^= 1 << b
			loc := uint64(w)*64 + b
			if inExtent(ext, loc) {
				continue
			}
			if !fn(loc) {
				return nil
			}
		}
	}
	return nil
}

func inExtent(ext []extent, loc uint64) bool {
	for _, e := range ext {
		if loc >= e.chunk && loc < e.chunk+e.chunks {
			return true
		}
	}
	return false
}

// ReadMapAhead reads back the data space map's pages of chunks locs that
// are paged out, with no lock held across the reads (concurrently), so
// that changes to those chunks that follow, such as a delete's FreeData
// calls under the caller's locks, find their pages in memory instead of
// reading each under mu. It reads at most half the map's limit of pages;
// a page that changed meanwhile (spaceMap.changes) is left as it is, and a
// read that fails is left for the change that needs the page to meet.
func (m *Meta) ReadMapAhead(locs []uint64) {
	type want struct {
		pi      uint64
		bp      ptr
		changes uint32
		p       *bitPage
		ok      bool
	}
	var ws []want
	m.mu.RLock()
	s := m.dataSM
	most := max(1, s.limit/2)
	if s.fetch == nil || s.limit <= 0 || s.out == 0 {
		m.mu.RUnlock()
		return
	}
	for _, loc := range locs {
		if loc >= s.nbits || len(ws) == most {
			continue
		}
		pi := loc / bitsPerPage
		if s.words[pi] != nil || slices.ContainsFunc(ws, func(w want) bool { return w.pi == pi }) {
			continue
		}
		ws = append(ws, want{pi: pi, bp: s.pages[pi], changes: s.changes[pi]})
	}
	nbits := s.nbits
	m.mu.RUnlock()
	if len(ws) == 0 {
		return
	}
	var wg sync.WaitGroup
	for i := range ws {
		wg.Go(func() {
			w := &ws[i]
			raw := make([]byte, PageSize)
			if m.readPage(raw, w.bp.loc) != nil {
				return
			}
			w.p = new(bitPage)
			w.ok = decodeBitmap(raw, w.bp.loc, w.bp.tx, int(w.pi), nbits, w.p) == nil
		})
	}
	wg.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range ws {
		// Still paged out, and not changed since: a page read back,
		// changed and written out again in the same transaction is
		// rewritten where it was, so its location alone does not say.
		if w.ok && s.words[w.pi] == nil && s.changes[w.pi] == w.changes && s.pages[w.pi] == w.bp {
			s.install(w.pi, w.p)
		}
	}
}

// restoreBit sets (or clears) data chunk loc's bit again, undoing what an
// operation changed. Its page may have been written out and paged out
// since (a paged data map over its limit, section 32), so this may read
// it back; if that fails, the open transaction's map is not what it must
// be (a chunk could be handed out twice, or leak), and it is lost (fail).
func (m *Meta) restoreBit(loc uint64, set bool) {
	change := m.dataSM.clear
	if set {
		change = m.dataSM.set
	}
	if err := change(loc); err != nil {
		m.fail(fmt.Errorf("meta: undo of data chunk %d's bit: %w", loc, err))
	}
}
