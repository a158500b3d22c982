//go:build !linux

package blockdev

import "fmt"

// URing is a Device over io_uring. io_uring exists only on Linux: here
// OpenURing and CreateURing return an error wrapping ErrNotSupported, and
// callers use File.
type URing struct{}

var errURingLinuxOnly = fmt.Errorf("blockdev: io_uring is Linux-only: use blockdev.File instead: %w", ErrNotSupported)

// OpenURing returns an error wrapping ErrNotSupported on this system.
func OpenURing(path string, opts URingOptions) (*URing, error) { return nil, errURingLinuxOnly }

// CreateURing returns an error wrapping ErrNotSupported on this system.
func CreateURing(path string, size int64, opts URingOptions) (*URing, error) {
	return nil, errURingLinuxOnly
}

// ReadAt implements Device; it always fails here.
func (u *URing) ReadAt(p []byte, off int64) (int, error) { return 0, errURingLinuxOnly }

// WriteAt implements Device; it always fails here.
func (u *URing) WriteAt(p []byte, off int64) (int, error) { return 0, errURingLinuxOnly }

// Flush implements Device; it always fails here.
func (u *URing) Flush() error { return errURingLinuxOnly }

// Discard implements Device; it always fails here.
func (u *URing) Discard(off, n int64) error { return errURingLinuxOnly }

// WriteZeroes implements ZeroWriter; it always fails here.
func (u *URing) WriteZeroes(off, n int64) error { return errURingLinuxOnly }

// MapAllocation implements AllocationMapper; it always fails here.
func (u *URing) MapAllocation(off, n int64) (int64, Allocation, error) {
	return 0, Allocated, errURingLinuxOnly
}

// Size implements Device.
func (u *URing) Size() int64 { return 0 }

// BlockSize implements Device.
func (u *URing) BlockSize() int { return 4096 }

// Close implements Device; it always fails here.
func (u *URing) Close() error { return errURingLinuxOnly }

// Lock implements Locker; it always fails.
func (u *URing) Lock(LockMode) error { return errURingLinuxOnly }

// Unlock implements Locker; it always fails.
func (u *URing) Unlock() error { return errURingLinuxOnly }

// ReadOnly implements ReadOnlyReporter.
func (u *URing) ReadOnly() bool { return false }
