package snapshot

import (
	"errors"
	"fmt"
	"sync"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// allocator hands out data chunks from the metadata layer's data space
// map (meta.AllocDataBatch), and remembers the chunks allocated for a copy
// in flight: taken, being written, and not yet referenced by an index
// entry. A tree commit frozen meanwhile shows those free (meta.Freeze's
// inflight), so a crash after it leaks none of them. A chunk freed by an
// entry's removal (meta.FreeData) is held by the layer until the tree
// commit of its transaction is durable, then released under Store.reclaim
// (Store.releaseFreed), so neither a crash nor a read in flight can see it
// reused early.
//
// It takes chunks from the layer allocReserve at a time and keeps those
// not handed out yet in a reserve, counted in flight too: a copy-on-write
// then takes the layer's lock (exclusive, which stops its readers) once
// per batch instead of once per chunk. The reserve is in flight, so a
// commit or a crash shows it free; Stats and the low-space warning count
// it free (space).
type allocator struct {
	// mu guards inflight, list and reserve. Lock order: after Store.mu,
	// before the meta layer's locks. A freeze holds it, so an allocation
	// is either in the frozen transaction's in-flight list or after the
	// freeze.
	mu       sync.Mutex
	m        *meta.Meta
	inflight map[uint64]struct{}
	list     []uint64 // Freeze's in-flight list, reused
	// reserve[next:] are allocated in the layer and in flight, in the
	// order the layer gave them (ascending while the free space is one
	// run, so a sequential write's copies make one extent).
	reserve []uint64
	next    int
}

// allocReserve is how many data chunks the allocator takes from the layer
// at once: the layer's lock once per 32 copies, and at most 32 chunks of
// a full store held back from an operation that does not allocate through
// the allocator (GrowMetadata drops the reserve first).
const allocReserve = 32

func newAllocator(m *meta.Meta) *allocator {
	return &allocator{m: m, inflight: map[uint64]struct{}{}, reserve: make([]uint64, 0, allocReserve)}
}

// take hands out one data chunk, in flight until adopt or release; ok is
// false when the data space is full. Other errors (a failed layer) are
// returned.
func (a *allocator) take() (loc uint64, ok bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next == len(a.reserve) {
		a.reserve, err = a.m.AllocDataBatch(a.reserve[:0], allocReserve)
		a.next = 0
		if err != nil {
			a.reserve = a.reserve[:0]
			if errors.Is(err, meta.ErrNoSpace) {
				return 0, false, nil
			}
			return 0, false, err
		}
		for _, l := range a.reserve {
			a.inflight[l] = struct{}{}
		}
	}
	loc = a.reserve[a.next]
	a.next++
	return loc, true, nil
}

// adopt moves in-flight chunks [loc, loc+n) to referenced (their entries
// are in the index now). Called with Store.mu held.
func (a *allocator) adopt(loc, n uint64) {
	a.mu.Lock()
	for i := uint64(0); i < n; i++ {
		delete(a.inflight, loc+i)
	}
	a.mu.Unlock()
}

// release returns an in-flight chunk that was never referenced: to the
// reserve, the next to be handed out, where it has room (it came from
// there), else to the layer.
func (a *allocator) release(loc uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next > 0 {
		a.next--
		a.reserve[a.next] = loc
		return nil
	}
	delete(a.inflight, loc)
	return a.m.ReturnData(loc)
}

// growMetadata grows the layer's metadata region into chunks free data
// chunks (meta.GrowFromData). The reserve may sit in the run of free
// chunks that needs: it goes back to the layer first, and mu keeps a copy
// from taking a new one before the region has its run.
func (a *allocator) growMetadata(chunks uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.dropReserveLocked(); err != nil {
		return err
	}
	_, err := a.m.GrowFromData(chunks)
	return err
}

// dropReserveLocked gives the reserve back to the layer. Called with mu
// held.
func (a *allocator) dropReserveLocked() error {
	var errs []error
	for _, loc := range a.reserve[a.next:] {
		delete(a.inflight, loc)
		if err := a.m.ReturnData(loc); err != nil {
			errs = append(errs, err)
		}
	}
	a.reserve, a.next = a.reserve[:0], 0
	return errors.Join(errs...)
}

// space is the layer's Space with the reserve counted free: one instant
// of both (a refill holds mu).
func (a *allocator) space() meta.Space {
	a.mu.Lock()
	defer a.mu.Unlock()
	sp := a.m.Space()
	sp.ChunksUsed -= uint64(len(a.reserve) - a.next)
	return sp
}

// freeze freezes the open metadata transaction as a tree commit covering
// journal record upTo, with the in-flight chunks kept out of it. Called
// with Store.mu held exclusively and no other capture outstanding.
func (a *allocator) freeze(upTo uint64) (*meta.Frozen, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.list = a.list[:0]
	for loc := range a.inflight {
		a.list = append(a.list, loc)
	}
	return a.m.Freeze(upTo, a.list)
}

// hasPending reports whether some freed chunks wait for a tree commit.
func (a *allocator) hasPending() bool { return a.m.DataHeld() > 0 }

// mark claims loc for an entry being replayed; false if it is out of
// range or already referenced.
func (a *allocator) mark(loc uint64) bool { return a.m.MarkData(loc) == nil }

// metaErr maps a layer error to the store's: ErrNoSpace stays ErrNoSpace
// (with the layer's words), anything else is reported as it is.
func metaErr(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, meta.ErrChanged):
		return storeChanged(err) // a read-only store beside a writer (livero.go)
	case errors.Is(err, meta.ErrNoSpace):
		return fmt.Errorf("%w: %s: %v", ErrNoSpace, what, err)
	case errors.Is(err, meta.ErrCorrupt):
		return fmt.Errorf("%w: %s: %v", ErrCorrupt, what, err)
	case errors.Is(err, meta.ErrClosed):
		// An I/O call that raced Close: the store's typed error, as the
		// calls that start after Close get.
		return fmt.Errorf("%w: %s: %v", ErrClosed, what, err)
	}
	return fmt.Errorf("snapshot: %s: %w", what, err)
}
