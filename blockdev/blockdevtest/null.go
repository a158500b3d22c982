package blockdevtest

import (
	"fmt"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Null is a data-less Device for scale runs: writes are checked and
// dropped, reads return zeros, and it can be any size without using
// memory. It keeps the Device contract's errors (alignment, range, Close)
// but not its data promise, so it is only for benchmarks and tests whose
// subject is metadata, such as a store whose data region holds millions of
// chunks nobody reads back.
type Null struct {
	size   int64
	bs     int
	closed atomic.Bool
	writes atomic.Int64
}

// NewNull returns a Null device of size bytes and the given block size
// (512 or 4096).
func NewNull(size int64, blockSize int) (*Null, error) {
	if blockSize != 512 && blockSize != 4096 {
		return nil, fmt.Errorf("blockdevtest: null: block size %d: %w", blockSize, blockdev.ErrNotSupported)
	}
	if size < 0 || size%int64(blockSize) != 0 {
		return nil, fmt.Errorf("blockdevtest: null: size %d: %w", size, blockdev.ErrMisaligned)
	}
	return &Null{size: size, bs: blockSize}, nil
}

func (d *Null) check(off, n int64) error {
	if d.closed.Load() {
		return blockdev.ErrClosed
	}
	return blockdev.CheckRange(off, n, d.size, d.bs)
}

// ReadAt implements blockdev.Device: the range reads as zeros.
func (d *Null) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	clear(p)
	return len(p), nil
}

// WriteAt implements blockdev.Device: the data is dropped.
func (d *Null) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	d.writes.Add(1)
	return len(p), nil
}

// Flush implements blockdev.Device.
func (d *Null) Flush() error {
	if d.closed.Load() {
		return blockdev.ErrClosed
	}
	return nil
}

// Discard implements blockdev.Device.
func (d *Null) Discard(off, n int64) error { return d.check(off, n) }

// Size implements blockdev.Device.
func (d *Null) Size() int64 { return d.size }

// BlockSize implements blockdev.Device.
func (d *Null) BlockSize() int { return d.bs }

// Writes returns the number of WriteAt calls that succeeded.
func (d *Null) Writes() int64 { return d.writes.Load() }

// Close implements blockdev.Device.
func (d *Null) Close() error {
	if d.closed.Swap(true) {
		return blockdev.ErrClosed
	}
	return nil
}
