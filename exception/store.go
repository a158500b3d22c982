package exception

import (
	"fmt"
	"sync"
)

// store is where a snapshot's exceptions live: the allocation of COW chunks
// and the durable (or not) record of which origin chunk each one holds. The
// lookup structure for I/O is the snapshot's chunk table; a store keeps the
// exceptions in order for merging, Status and Check.
type store interface {
	// reserve allocates a COW chunk for origin chunk old. It returns an
	// error wrapping ErrNoSpace when the COW device is full and
	// ErrInvalidSnapshot once the store is invalid. seq identifies the
	// reservation to commit.
	reserve(old uint64) (newChunk, seq uint64, err error)
	// commit records the exception once its data is written (copyErr nil)
	// or gives the reservation up (copyErr non-nil, which invalidates a
	// persistent store). It returns when the exception is as durable as the
	// store makes it; an error means the exception does not exist.
	commit(seq, old, newChunk uint64, copyErr error) error
	// invalidate marks the store invalid (persistent: header valid 0).
	invalidate(cause error)
	// tail returns up to max exceptions from the end of the list, all from
	// the list's last metadata area, in list order.
	tail(dst []Exception, max int) []Exception
	// removeTail drops the last n exceptions (those tail returned).
	removeTail(n int) error
	// entries calls fn with the exceptions in list order.
	entries(fn func([]Exception))
	usage() storeUsage
	// close stops background work; clean says the store was not
	// invalidated and may drop its crash-recovery state.
	close() error
}

// storeUsage is what Status reports about a store, in chunks.
type storeUsage struct {
	total, used, metadata, exceptions, inFlight, leaked, merged uint64
	invalid                                                     error
}

// transient is the in-memory store: nothing survives Close. COW chunks are
// allocated sequentially from chunk 0; exceptions complete in any order.
type transient struct {
	limit uint64 // number of COW chunks

	mu      sync.Mutex // guards the fields below
	next    uint64
	list    []Exception
	flight  uint64 // reserved, not committed
	leaked  uint64 // reserved, then given up
	removed uint64 // merged away
	invalid error
}

func newTransient(devSize, cs int64) *transient {
	return &transient{limit: uint64(devSize / cs)}
}

func (t *transient) reserve(old uint64) (uint64, uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.invalid != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrInvalidSnapshot, t.invalid)
	}
	if t.next >= t.limit {
		return 0, 0, fmt.Errorf("%w: all %d chunks used", ErrNoSpace, t.limit)
	}
	t.next++
	t.flight++
	return t.next - 1, 0, nil
}

func (t *transient) commit(_, old, newChunk uint64, copyErr error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.flight--
	if copyErr != nil {
		t.leaked++
		return copyErr
	}
	if t.invalid != nil {
		t.leaked++
		return fmt.Errorf("%w: %w", ErrInvalidSnapshot, t.invalid)
	}
	t.list = append(t.list, Exception{Old: old, New: newChunk})
	return nil
}

func (t *transient) invalidate(cause error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.invalid == nil {
		t.invalid = cause
	}
}

func (t *transient) tail(dst []Exception, n int) []Exception {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := min(n, len(t.list))
	return append(dst[:0], t.list[len(t.list)-k:]...)
}

func (t *transient) removeTail(n int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.list = t.list[:len(t.list)-n]
	t.removed += uint64(n)
	return nil
}

func (t *transient) entries(fn func([]Exception)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fn(t.list)
}

func (t *transient) usage() storeUsage {
	t.mu.Lock()
	defer t.mu.Unlock()
	return storeUsage{total: t.limit, used: t.next, exceptions: uint64(len(t.list)),
		inFlight: t.flight, leaked: t.leaked, merged: t.removed, invalid: t.invalid}
}

func (t *transient) close() error { return nil }
