package blockdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
)

// copyPiece is how many bytes Copy and Equal move per device call: large
// enough to amortise the call, small enough to keep memory flat.
const copyPiece = 1 << 20

// Copy makes dst's first src.Size() bytes equal to src, then flushes dst. It
// reads only what src may hold: the holes src reports through
// AllocationMapper are not read, and they and every all-zero block read are
// made zero on dst with Discard (WriteZeroes where dst does not support
// Discard) instead of being written, unless dst already reports the range
// as a hole. So a sparse source stays sparse on a sparse destination.
//
// dst must be at least as large as src, and src's size a multiple of both
// block sizes. progress, if not nil, is called after each piece with the
// bytes of src covered so far and src's size. Copy stops when ctx ends; dst
// then holds a prefix of the copy.
func Copy(ctx context.Context, dst, src Device, progress func(done, total int64)) error {
	size := src.Size()
	bs := int64(max(src.BlockSize(), dst.BlockSize()))
	if dst.Size() < size {
		return fmt.Errorf("%w: copy of %d bytes onto a device of %d", ErrOutOfRange, size, dst.Size())
	}
	if size%bs != 0 {
		return fmt.Errorf("%w: copy of %d bytes in blocks of %d", ErrMisaligned, size, bs)
	}
	c := copier{ctx: ctx, dst: dst, src: src, bs: bs, total: size, progress: progress}
	for x, err := range AllocationExtents(src) {
		if err != nil {
			return fmt.Errorf("blockdev: copy: source: %w", err)
		}
		if x.Zero {
			err = c.zero(x.Off, x.Len)
		} else {
			err = c.data(x.Off, x.Len)
		}
		if err != nil {
			return err
		}
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("blockdev: copy: flush destination: %w", err)
	}
	return nil
}

// copier is the state of one Copy.
type copier struct {
	ctx      context.Context
	dst, src Device
	bs       int64
	buf      []byte
	done     int64
	total    int64
	progress func(done, total int64)
}

func (c *copier) report(n int64) {
	c.done += n
	if c.progress != nil {
		c.progress(c.done, c.total)
	}
}

// zero makes [off, off+n) of dst read as zeros.
func (c *copier) zero(off, n int64) error {
	if err := c.ctx.Err(); err != nil {
		return err
	}
	if err := makeZero(c.dst, off, n); err != nil {
		return fmt.Errorf("blockdev: copy: zero destination [%d, +%d): %w", off, n, err)
	}
	c.report(n)
	return nil
}

// makeZero makes [off, off+n) of d read as zeros, doing nothing where d
// says it already does.
func makeZero(d Device, off, n int64) error {
	if readsZero(d, off, n) {
		return nil
	}
	err := d.Discard(off, n)
	if errors.Is(err, ErrNotSupported) {
		err = WriteZeroes(d, off, n)
	}
	return err
}

// data copies [off, off+n), sending runs of zero blocks as zeroing.
func (c *copier) data(off, n int64) error {
	if c.buf == nil {
		c.buf = AlignedBuffer(int(min(copyPiece, c.total)))
	}
	return ScanRuns(c.ctx, c.src, off, n, c.buf, c.bs, func(at int64, p []byte, zero bool) error {
		var err error
		if zero {
			err = makeZero(c.dst, at, int64(len(p)))
		} else {
			_, err = c.dst.WriteAt(p, at)
		}
		if err != nil {
			return fmt.Errorf("blockdev: copy: write destination at %d: %w", at, err)
		}
		c.report(int64(len(p)))
		return nil
	})
}

// ScanRuns reads [off, off+n) of dev into buf, a piece at a time, and calls
// fn for each run of consecutive blocks of bs bytes that are all zero
// (zero true) or all hold data, in offset order; p holds the run's bytes
// and is valid until fn returns. A run never spans two pieces, so one run
// of the device may come as several. buf's length must be a multiple of
// bs, as must off and n. It stops at the first error of a read, of fn or
// of ctx. Copy and diffstream.Export scan what they read with it.
func ScanRuns(ctx context.Context, dev Device, off, n int64, buf []byte, bs int64, fn func(off int64, p []byte, zero bool) error) error {
	if bs <= 0 || int64(len(buf)) < bs || int64(len(buf))%bs != 0 || off%bs != 0 || n%bs != 0 {
		return fmt.Errorf("%w: scan of [%d, +%d) through %d bytes in blocks of %d", ErrMisaligned, off, n, len(buf), bs)
	}
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		k := min(n, int64(len(buf)))
		p := buf[:k]
		if _, err := dev.ReadAt(p, off); err != nil {
			return fmt.Errorf("blockdev: read at %d: %w", off, err)
		}
		for i := int64(0); i < k; {
			zero := IsZero(p[i : i+bs])
			j := i + bs
			for j < k && IsZero(p[j:j+bs]) == zero {
				j += bs
			}
			if err := fn(off+i, p[i:j], zero); err != nil {
				return err
			}
			i = j
		}
		off += k
		n -= k
	}
	return nil
}

// Equal compares the contents of a and b. It returns true and -1 when they
// are equal; otherwise false and the offset of the first byte that differs
// (the smaller size when only the sizes differ). Ranges both devices report
// as holes through AllocationMapper are not read. It stops when ctx ends.
func Equal(ctx context.Context, a, b Device) (bool, int64, error) {
	size := min(a.Size(), b.Size())
	bs := int64(max(a.BlockSize(), b.BlockSize()))
	if size%bs != 0 {
		return false, 0, fmt.Errorf("%w: compare of %d bytes in blocks of %d", ErrMisaligned, size, bs)
	}
	n := int(min(copyPiece, max(size, bs)))
	pa, pb := AlignedBuffer(n), AlignedBuffer(n)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return false, 0, err
		}
		k := min(int64(n), size-off)
		if readsZero(a, off, k) && readsZero(b, off, k) {
			off += k
			continue
		}
		if _, err := a.ReadAt(pa[:k], off); err != nil {
			return false, 0, fmt.Errorf("blockdev: compare: read at %d: %w", off, err)
		}
		if _, err := b.ReadAt(pb[:k], off); err != nil {
			return false, 0, fmt.Errorf("blockdev: compare: read at %d: %w", off, err)
		}
		if !bytes.Equal(pa[:k], pb[:k]) {
			i := int64(0)
			for pa[i] == pb[i] {
				i++
			}
			return false, off + i, nil
		}
		off += k
	}
	if a.Size() != b.Size() {
		return false, size, nil
	}
	return true, -1, nil
}
