package snapshot

import (
	"time"

	"github.com/blocksnap/blocksnap/snapshot/internal/lockstat"
)

// LockStat is one lock's longest exclusive hold, longest span held shared
// (what a writer waiting for it waits for) and longest wait to take it,
// each with the function that ended it.
type LockStat = lockstat.Stats

// LockStats are diagnostics for writer stalls: the store lock's and the
// metadata layer's lock's maxima since the last ResetLockStats (or Open).
// Measured in-process, they are far less sensitive to a loaded machine's
// scheduler than a writer's wall-clock stall (docs/metadata.md section 16).
type LockStats struct {
	Store, Meta LockStat
	// MaxPageRead is the slowest metadata page read, MaxSelfWrite the
	// slowest write-back the index's writer did itself under the layer's
	// lock, MaxChangeMiss the most pages one index change read under it.
	MaxPageRead, MaxSelfWrite time.Duration
	MaxChangeMiss             int64
	// ChangesMissed counts the index changes that read a page.
	ChangesMissed uint64
	// MaxThrottle is the longest a writer waited, with no lock held, for
	// the metadata write-back to catch up (dirty pages past three
	// quarters of the cache); Throttled counts such waits.
	MaxThrottle time.Duration
	Throttled   uint64
	// WriteBackHelped counts the metadata pages throttled writers wrote
	// themselves rather than wait for the write-back goroutine.
	WriteBackHelped uint64
	// MetaLockedReads counts the metadata pages read with the layer's
	// lock held, shared or exclusively: an index change (which takes it
	// exclusively, under Store.mu) waits for each.
	MetaLockedReads uint64
	// MaxBufferWait is the longest an origin writer waited for room in
	// the origin buffer (Options.OriginBuffer) when it was full: for its
	// own drain (a journal commit, then the buffered chunks written out)
	// or for another's. BufferWaits counts such waits.
	MaxBufferWait time.Duration
	BufferWaits   uint64
}

// LockStats reports the lock maxima since the last ResetLockStats.
func (s *Store) LockStats() LockStats {
	st := s.m.Stalls()
	return LockStats{Store: s.mu.Stats(), Meta: st.Lock, MaxPageRead: st.MaxPageRead,
		MaxSelfWrite: st.MaxSelfWrite, MaxChangeMiss: st.MaxChangeMiss, ChangesMissed: st.ChangesMissed,
		MaxThrottle: st.MaxThrottle, Throttled: st.Throttled, WriteBackHelped: st.Helped,
		MetaLockedReads: st.LockedReads,
		MaxBufferWait:   time.Duration(s.ob.waitMax.Load()), BufferWaits: s.ob.waits.Load()}
}

// ResetLockStats clears what LockStats reports.
func (s *Store) ResetLockStats() {
	s.mu.Reset()
	s.m.ResetStalls()
	s.ob.waitMax.Reset()
	s.ob.waits.Store(0)
}
