package blockdev

import (
	"fmt"
	"sync/atomic"
)

// SliceDevice is a window [off, off+size) of another device, presented as a
// device of its own; see Slice. Closing it does not close the parent.
type SliceDevice struct {
	dev    Device
	off    int64
	size   int64
	closed atomic.Bool
}

// Slice returns the region [off, off+size) of dev as a Device, so that
// metadata and data (or origin, store and journal) can share one device.
// off and size must be multiples of dev's block size and lie within it.
// Closing the slice does not close dev.
func Slice(dev Device, off, size int64) (*SliceDevice, error) {
	if err := CheckRange(off, size, dev.Size(), dev.BlockSize()); err != nil {
		return nil, fmt.Errorf("blockdev: slice: %w", err)
	}
	return &SliceDevice{dev: dev, off: off, size: size}, nil
}

func (s *SliceDevice) check(off, n int64) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return CheckRange(off, n, s.size, s.dev.BlockSize())
}

// ReadAt implements Device.
func (s *SliceDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.dev.ReadAt(p, s.off+off)
}

// WriteAt implements Device.
func (s *SliceDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.dev.WriteAt(p, s.off+off)
}

// WriteAtFUA implements FUAWriter by passing the write down.
func (s *SliceDevice) WriteAtFUA(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return WriteFUA(s.dev, p, s.off+off)
}

// WriteZeroes implements ZeroWriter by passing the request down.
func (s *SliceDevice) WriteZeroes(off, n int64) error {
	if err := s.check(off, n); err != nil {
		return err
	}
	return WriteZeroes(s.dev, s.off+off, n)
}

// Flush implements Device; it flushes the whole parent device.
func (s *SliceDevice) Flush() error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.dev.Flush()
}

// Discard implements Device.
func (s *SliceDevice) Discard(off, n int64) error {
	if err := s.check(off, n); err != nil {
		return err
	}
	return s.dev.Discard(s.off+off, n)
}

// MapAllocation implements AllocationMapper where the parent does.
func (s *SliceDevice) MapAllocation(off, n int64) (int64, Allocation, error) {
	if err := s.check(off, n); err != nil {
		return 0, Allocated, err
	}
	if m, ok := s.dev.(AllocationMapper); ok {
		return m.MapAllocation(s.off+off, n)
	}
	return n, Allocated, nil
}

// Size implements Device.
func (s *SliceDevice) Size() int64 { return s.size }

// BlockSize implements Device.
func (s *SliceDevice) BlockSize() int { return s.dev.BlockSize() }

// Close implements Device; the parent stays open.
func (s *SliceDevice) Close() error {
	if s.closed.Swap(true) {
		return ErrClosed
	}
	return nil
}
