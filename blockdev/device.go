// Package blockdev defines the Device contract that every block device in
// blocksnap honours, and the devices the library ships: Mem (RAM, sparse),
// File (pread/pwrite on a regular file or block device node, optionally
// O_DIRECT), URing (io_uring, Linux), Slice (a region of another device) and
// ReadOnly.
//
// Every volume an engine hands out (an exception snapshot, a shared-store
// clone, a hydrating clone, an NBD export seen through the client) is itself
// a Device, so engines stack and any of them can be exported over NBD.
//
// Helpers that work on any Device: Copy (skipping holes and zero blocks),
// Equal, AllocationExtents, and Writer, which lets a byte stream of any
// alignment (io.Copy from a connection) be written into a device.
//
// The conformance suite in package blockdevtest checks an implementation
// against this contract, in the manner of testing/fstest.
package blockdev

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Device is a block device: a fixed-size array of bytes addressed in units of
// BlockSize.
//
// Alignment and bounds: off and len(p) (and, for Discard, off and n) must be
// multiples of BlockSize, otherwise the call fails with an error wrapping
// ErrMisaligned and does nothing. A range that does not lie entirely within
// [0, Size()) fails with ErrOutOfRange and does nothing. A zero-length call
// at an aligned offset within [0, Size()] succeeds and does nothing.
//
// ReadAt and WriteAt are full-transfer: either n == len(p) and err == nil, or
// err != nil. A failed WriteAt may have written any subset of the range (as a
// disk might), but never bytes outside it.
//
// Concurrency: a Device is safe for concurrent use by many goroutines;
// concurrency is how callers get queue depth. Concurrent writes to the same
// block leave one of the writes in it, never a mix within a block. A read
// that overlaps a write still in progress may return any mix of the old and
// the new contents (as a disk, or the Linux page cache, may); callers that
// need more order their I/O themselves.
//
// Flush is a durability barrier: when it returns nil, every write (and
// discard) that completed before Flush was called is durable. Writes that did
// not complete before Flush was called carry no promise. Devices that can
// write with force-unit-access implement FUAWriter; it is optional.
//
// Discard: afterwards the range reads as zeros; the device may deallocate it.
// A discard on one volume never changes another volume's contents.
//
// After Close every call returns an error wrapping ErrClosed (Close itself
// included, after the first). Writing a read-only device returns ErrReadOnly.
type Device interface {
	// ReadAt reads len(p) bytes at off. See the type's comment.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes len(p) bytes at off. See the type's comment.
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write that completed before the call durable.
	Flush() error
	// Discard makes [off, off+n) read as zeros, and may free its space.
	Discard(off, n int64) error
	// Size is the device's size in bytes, a multiple of BlockSize.
	Size() int64
	// BlockSize is the logical block size in bytes: 512 or 4096.
	BlockSize() int
	// Close releases the device. It does not imply Flush.
	Close() error
}

// FUAWriter is implemented by devices that can make a single write durable
// without a full Flush (force unit access). Callers fall back to WriteAt
// followed by Flush where a device does not implement it; see WriteFUA.
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// ZeroWriter is implemented by devices that can write zeros to a range
// without being handed a buffer of zeros. Unlike Discard, the range stays
// allocated where the device allocates at all.
type ZeroWriter interface {
	WriteZeroes(off, n int64) error
}

// Allocation describes what a range of a device holds, for callers (such as
// the NBD server's block status) that can skip holes.
type Allocation uint8

const (
	// Allocated: the range may hold data.
	Allocated Allocation = 0
	// Hole: the range is unallocated (it reads as zeros).
	Hole Allocation = 1
	// Zero: the range reads as zeros (it may still be allocated).
	Zero Allocation = 2
)

// AllocationMapper is implemented by devices that can tell holes from data.
// MapAllocation returns the state of a prefix of [off, off+n): the length of
// the prefix (> 0, at most n, a multiple of BlockSize) and its state. It
// follows the Device's alignment and bounds rules.
type AllocationMapper interface {
	MapAllocation(off, n int64) (length int64, state Allocation, err error)
}

// Sentinel errors. Devices wrap them with the offending values; callers test
// them with errors.Is.
var (
	ErrMisaligned   = errors.New("blockdev: misaligned I/O")
	ErrOutOfRange   = errors.New("blockdev: I/O out of range")
	ErrClosed       = errors.New("blockdev: device closed")
	ErrReadOnly     = errors.New("blockdev: device is read-only")
	ErrNotSupported = errors.New("blockdev: not supported")
	// ErrIO is a generic device error, used by wrappers (such as fault
	// injection) that need an I/O error to return.
	ErrIO = errors.New("blockdev: I/O error")
	// ErrNoSpace: the device (or the store behind it) has no room for a
	// write. Every engine's no-space error wraps it, so that a server
	// exporting any volume can answer ENOSPC without knowing the engine.
	ErrNoSpace = errors.New("blockdev: no space left on device")
)

// CheckRange validates an I/O of n bytes at off against a device of the
// given size and block size, and returns an error wrapping ErrMisaligned or
// ErrOutOfRange, or nil. Devices and engines use it so that every one of them
// reports bad input the same way.
func CheckRange(off, n, size int64, blockSize int) error {
	bs := int64(blockSize)
	if off%bs != 0 || n%bs != 0 {
		return fmt.Errorf("%w: offset %d length %d block size %d", ErrMisaligned, off, n, bs)
	}
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d device size %d", ErrOutOfRange, off, n, size)
	}
	return nil
}

// WriteFUA writes p at off and makes it durable before returning: through
// FUAWriter where the device offers it, otherwise with WriteAt then Flush.
func WriteFUA(d Device, p []byte, off int64) (int, error) {
	if f, ok := d.(FUAWriter); ok {
		return f.WriteAtFUA(p, off)
	}
	n, err := d.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	if err := d.Flush(); err != nil {
		return 0, err
	}
	return n, nil
}

// WriteZeroes makes [off, off+n) read as zeros and stay allocated: through
// ZeroWriter where the device offers it, otherwise by writing zero buffers.
func WriteZeroes(d Device, off, n int64) error {
	if z, ok := d.(ZeroWriter); ok {
		return z.WriteZeroes(off, n)
	}
	if err := CheckRange(off, n, d.Size(), d.BlockSize()); err != nil {
		return err
	}
	const chunk = 1 << 20
	buf := make([]byte, min(n, chunk))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := d.WriteAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// IsZero reports whether p holds only zero bytes.
func IsZero(p []byte) bool {
	// 32 bytes at a time as four word loads (Copy and the exports scan
	// every block they read with it); the tail byte by byte.
	i := 0
	for ; i+32 <= len(p); i += 32 {
		q := p[i : i+32 : i+32]
		if binary.LittleEndian.Uint64(q)|binary.LittleEndian.Uint64(q[8:])|
			binary.LittleEndian.Uint64(q[16:])|binary.LittleEndian.Uint64(q[24:]) != 0 {
			return false
		}
	}
	for ; i < len(p); i++ {
		if p[i] != 0 {
			return false
		}
	}
	return true
}
