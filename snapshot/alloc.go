package snapshot

import (
	"errors"
	"fmt"
	"sync"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// allocator hands out data chunks from the metadata layer's data space
// map (meta.AllocDataRun), and remembers the chunks allocated for a copy
// in flight: taken, being written, and not yet referenced by an index
// entry. A tree commit frozen meanwhile shows those free (meta.Freeze's
// inflight), so a crash after it leaks none of them. A chunk freed by an
// entry's removal (meta.FreeData) is held by the layer until the tree
// commit of its transaction is durable, then released under Store.reclaim
// (Store.releaseFreed), so neither a crash nor a read in flight can see it
// reused early.
type allocator struct {
	// mu guards inflight and list. Lock order: after Store.mu, before the
	// meta layer's locks. A freeze holds it, so an allocation is either
	// in the frozen transaction's in-flight list or after the freeze.
	mu       sync.Mutex
	m        *meta.Meta
	inflight map[uint64]struct{}
	list     []uint64 // Freeze's in-flight list, reused
}

func newAllocator(m *meta.Meta) *allocator {
	return &allocator{m: m, inflight: map[uint64]struct{}{}}
}

// allocRun allocates up to want chunks at consecutive locations (at least
// one) and returns the first and the count; ok is false when the data
// space is full. Other errors (a failed layer) are returned. The chunks
// count as in flight until adopt or release.
func (a *allocator) allocRun(want int) (start uint64, got int, ok bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	start, got, err = a.m.AllocDataRun(want)
	if errors.Is(err, meta.ErrNoSpace) {
		return 0, 0, false, nil
	}
	if err != nil {
		return 0, 0, false, err
	}
	for i := uint64(0); i < uint64(got); i++ {
		a.inflight[start+i] = struct{}{}
	}
	return start, got, true, nil
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

// release returns in-flight chunks that were never referenced.
func (a *allocator) release(start uint64, n int) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for i := uint64(0); i < uint64(n); i++ {
		delete(a.inflight, start+i)
		if err := a.m.ReturnData(start + i); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
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
