package blockdev

import (
	"fmt"
	"iter"
)

// Extent is a byte range of a device or volume. Zero marks a range known to
// read as zeros (a hole, a discarded range) without reading it. It is the
// one extent type of the module: snapshot.Diff yields it, diffstream.Export
// consumes it, and AllocationExtents lists a device with it.
type Extent struct {
	Off, Len int64
	Zero     bool
}

// End returns the offset just past the extent.
func (x Extent) End() int64 { return x.Off + x.Len }

// AllocationExtents lists dev from offset 0 to its end as extents in offset
// order, adjacent ones of the same kind merged: the holes and zero ranges
// that dev reports through AllocationMapper as Zero extents, the rest as
// data. A device without AllocationMapper is one data extent.
func AllocationExtents(dev Device) iter.Seq2[Extent, error] {
	return func(yield func(Extent, error) bool) {
		size := dev.Size()
		m, ok := dev.(AllocationMapper)
		if !ok {
			if size > 0 {
				yield(Extent{Off: 0, Len: size}, nil)
			}
			return
		}
		var cur Extent
		for off := int64(0); off < size; {
			n, st, err := m.MapAllocation(off, size-off)
			if err != nil {
				yield(Extent{}, fmt.Errorf("blockdev: map allocation at %d: %w", off, err))
				return
			}
			if n <= 0 || n > size-off {
				yield(Extent{}, fmt.Errorf("blockdev: map allocation at %d: answer of %d bytes for %d: %w", off, n, size-off, ErrIO))
				return
			}
			x := Extent{Off: off, Len: n, Zero: st != Allocated}
			if cur.Len > 0 && cur.Zero == x.Zero {
				cur.Len += n
			} else {
				if cur.Len > 0 && !yield(cur, nil) {
					return
				}
				cur = x
			}
			off += n
		}
		if cur.Len > 0 {
			yield(cur, nil)
		}
	}
}

// readsZero reports whether dev says [off, off+n) reads as zeros, through
// AllocationMapper; false when it cannot tell.
func readsZero(dev Device, off, n int64) bool {
	m, ok := dev.(AllocationMapper)
	if !ok {
		return false
	}
	for n > 0 {
		k, st, err := m.MapAllocation(off, n)
		if err != nil || k <= 0 || st == Allocated {
			return false
		}
		off, n = off+k, n-k
	}
	return true
}
