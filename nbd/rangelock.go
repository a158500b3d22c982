package nbd

import "sync"

// rangeLock serialises the read-modify-write of a partial block against
// every other write to that block. A read-modify-write holds its block
// exclusively; a write, trim or zeroing of whole blocks holds its range
// shared, so whole-block writes still run side by side while a
// read-modify-write cannot lose one of them (read old block, other write
// lands, write back old bytes over it).
//
// Waiting exclusive holders keep new shared holders of overlapping ranges
// out, and exclusive holders go in arrival order, so a stream of
// whole-block writes cannot starve a read-modify-write. No holder waits
// while holding, so there is no deadlock: an exclusive waiter waits only
// for holders and for earlier exclusive waiters.
//
// The zero value is ready to use. Ranges are byte offsets [lo, hi).
type rangeLock struct {
	mu      sync.Mutex // guards the fields below; a leaf lock
	cond    sync.Cond  // on mu; broadcast when an entry leaves and someone waits
	next    uint64     // ticket of the next entry
	entries []lockEntry
	waiting int // goroutines in cond.Wait
}

type lockEntry struct {
	lo, hi  int64
	id      uint64
	excl    bool
	waiting bool // an exclusive entry not yet granted
}

// lock takes [lo, hi) shared or exclusive and returns the ticket to
// unlock it with.
func (l *rangeLock) lock(lo, hi int64, excl bool) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cond.L == nil {
		l.cond.L = &l.mu
	}
	id := l.next
	l.next++
	if !excl {
		for l.conflict(lo, hi, id, false) {
			l.wait()
		}
		l.entries = append(l.entries, lockEntry{lo: lo, hi: hi, id: id})
		return id
	}
	l.entries = append(l.entries, lockEntry{lo: lo, hi: hi, id: id, excl: true, waiting: true})
	for l.conflict(lo, hi, id, true) {
		l.wait()
	}
	for i := range l.entries {
		if l.entries[i].id == id {
			l.entries[i].waiting = false
		}
	}
	return id
}

func (l *rangeLock) wait() {
	l.waiting++
	l.cond.Wait()
	l.waiting--
}

// conflict reports whether entry id, asking for [lo, hi), must wait. A
// shared request waits for any overlapping exclusive entry, granted or
// waiting; an exclusive one for any overlapping granted entry and for
// overlapping exclusive entries that arrived before it.
func (l *rangeLock) conflict(lo, hi int64, id uint64, excl bool) bool {
	for i := range l.entries {
		e := &l.entries[i]
		if e.id == id || e.hi <= lo || hi <= e.lo {
			continue
		}
		switch {
		case !excl && e.excl:
			return true
		case excl && !e.waiting:
			return true
		case excl && e.id < id:
			return true
		}
	}
	return false
}

// unlock releases the entry with ticket id.
func (l *rangeLock) unlock(id uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.entries {
		if l.entries[i].id == id {
			last := len(l.entries) - 1
			l.entries[i] = l.entries[last]
			l.entries = l.entries[:last]
			break
		}
	}
	if l.waiting > 0 {
		l.cond.Broadcast()
	}
}
