package blockdev

import (
	"fmt"
	"sync/atomic"
)

// ReadOnlyDevice is a read-only view of another device; see ReadOnly.
type ReadOnlyDevice struct {
	dev    Device
	closed atomic.Bool
}

// ReadOnly returns a view of dev whose writes and discards fail with
// ErrReadOnly. Reads and Flush pass through. Closing the view does not close
// dev.
func ReadOnly(dev Device) *ReadOnlyDevice { return &ReadOnlyDevice{dev: dev} }

func (r *ReadOnlyDevice) check(off, n int64) error {
	if r.closed.Load() {
		return ErrClosed
	}
	return CheckRange(off, n, r.dev.Size(), r.dev.BlockSize())
}

// ReadAt implements Device.
func (r *ReadOnlyDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := r.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return r.dev.ReadAt(p, off)
}

// WriteAt implements Device: it always fails.
func (r *ReadOnlyDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := r.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%w: write at %d", ErrReadOnly, off)
}

// Flush implements Device by passing it down.
func (r *ReadOnlyDevice) Flush() error {
	if r.closed.Load() {
		return ErrClosed
	}
	return r.dev.Flush()
}

// Discard implements Device: it always fails.
func (r *ReadOnlyDevice) Discard(off, n int64) error {
	if err := r.check(off, n); err != nil {
		return err
	}
	return fmt.Errorf("%w: discard at %d", ErrReadOnly, off)
}

// MapAllocation implements AllocationMapper where the parent does.
func (r *ReadOnlyDevice) MapAllocation(off, n int64) (int64, Allocation, error) {
	if err := r.check(off, n); err != nil {
		return 0, Allocated, err
	}
	if m, ok := r.dev.(AllocationMapper); ok {
		return m.MapAllocation(off, n)
	}
	return n, Allocated, nil
}

// Size implements Device.
func (r *ReadOnlyDevice) Size() int64 { return r.dev.Size() }

// BlockSize implements Device.
func (r *ReadOnlyDevice) BlockSize() int { return r.dev.BlockSize() }

// Close implements Device; the parent stays open.
func (r *ReadOnlyDevice) Close() error {
	if r.closed.Swap(true) {
		return ErrClosed
	}
	return nil
}

// ReadOnlyReporter is implemented by devices that can tell that they refuse
// every write (File opened read-only, URing likewise, the ReadOnly view, a
// Slice of any of them), so that an engine can refuse or adapt at open
// rather than accept writes it could never make durable.
type ReadOnlyReporter interface {
	// ReadOnly reports whether every write and discard fails with
	// ErrReadOnly.
	ReadOnly() bool
}

// IsReadOnly reports whether dev says it refuses every write (see
// ReadOnlyReporter). A device that does not say is taken as writable.
func IsReadOnly(dev Device) bool {
	r, ok := dev.(ReadOnlyReporter)
	return ok && r.ReadOnly()
}

// ReadOnly implements ReadOnlyReporter: always true.
func (r *ReadOnlyDevice) ReadOnly() bool { return true }

// ReadOnly implements ReadOnlyReporter.
func (d *File) ReadOnly() bool { return d.ro }

// ReadOnly implements ReadOnlyReporter: a slice of a read-only device is
// read-only.
func (s *SliceDevice) ReadOnly() bool { return IsReadOnly(s.dev) }
