package snapshot

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Holes and zeroes of a volume, answered from the metadata.
//
// A chunk of a snapshot or clone resolves (resolveLocked) to one of three
// things, and MapAllocation reports each as:
//   - a store chunk: Allocated;
//   - a zero mapping (locZero, left by Discard or WriteZeroes): Hole, since
//     it reads as zeros and holds no store space;
//   - the origin device, where no level of the volume's chain maps the
//     chunk: whatever the origin device reports, so a clone of a sparse
//     golden image shows the image's holes. An origin that cannot tell
//     reports Allocated, which is never wrong.
//
// The origin volume asks the origin device too, except for chunks whose new
// data still waits in the origin buffer, which are Allocated.

// mapChunkLimit bounds the chunks one MapAllocation call resolves, so one
// call over a huge volume answers a prefix in bounded time (the caller asks
// again for the rest, as the contract allows).
const mapChunkLimit = 1 << 16

// MapAllocation implements blockdev.AllocationMapper.
func (v *Volume) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if err := v.check(off, n); err != nil {
		return 0, blockdev.Allocated, err
	}
	var st blockdev.Allocation
	length := int64(0)
	for i := 0; length < n && i < mapChunkLimit; i++ {
		pos := off + length
		c := uint64(pos / v.s.cs)
		k := min(off+n, int64(c+1)*v.s.cs) - pos
		l, cst, err := v.s.chunkAllocation(v, c, pos, k)
		if err != nil {
			return 0, blockdev.Allocated, err
		}
		if length > 0 && cst != st {
			break
		}
		st = cst
		length += l
		if l < k {
			break // the origin answered a part of the chunk
		}
	}
	if err := v.notDeleted(); err != nil {
		return 0, blockdev.Allocated, err
	}
	return length, st, nil
}

// chunkAllocation returns the state of [pos, pos+k), which lies within
// chunk c, as volume v sees it: the length of a prefix (a multiple of the
// volume's block size) and its state.
func (s *Store) chunkAllocation(v *Volume, c uint64, pos, k int64) (int64, blockdev.Allocation, error) {
	if v.kind == KindOrigin {
		s.lockOrigin(c, c, false)
		buffered := s.bufferedLocked(c) != nil
		s.unlockOrigin(c, c, false)
		if buffered {
			return k, blockdev.Allocated, nil
		}
		return s.originAllocation(pos, k)
	}
	s.mu.RLock()
	loc, fromOrigin, err := s.resolveLocked(v.levels, c)
	s.mu.RUnlock()
	switch {
	case err != nil:
		return 0, blockdev.Allocated, err
	case fromOrigin && pos >= s.geo.originSize: // a clone grown past the origin
		return k, blockdev.Hole, nil
	case fromOrigin:
		return s.originAllocation(pos, min(k, s.geo.originSize-pos))
	case loc == locZero:
		return k, blockdev.Hole, nil
	}
	return k, blockdev.Allocated, nil
}

// originAllocation asks the origin device about [pos, pos+k), rounding its
// answer down to the volume's block size (a part block the origin calls a
// hole is reported with its block, as allocated).
func (s *Store) originAllocation(pos, k int64) (int64, blockdev.Allocation, error) {
	am, ok := s.origin.(blockdev.AllocationMapper)
	if !ok {
		return k, blockdev.Allocated, nil
	}
	l, st, err := am.MapAllocation(pos, k)
	if err != nil {
		return 0, blockdev.Allocated, fmt.Errorf("snapshot: origin allocation at %d: %w", pos, err)
	}
	bs := int64(s.bs)
	if l <= 0 || l > k {
		return k, blockdev.Allocated, nil // a mapper that breaks its contract
	}
	if l -= l % bs; l == 0 {
		return bs, blockdev.Allocated, nil
	}
	return l, st, nil
}

// WriteZeroes implements blockdev.ZeroWriter. On a clone, a whole chunk
// becomes a zero mapping: no store chunk is allocated, and the one it
// replaced is released unless a snapshot still needs it (the same path as
// Discard, since a zero mapping is what a clone's discard leaves). A part
// chunk is written as zeros. On the origin, zeros are written through the
// normal write path, so the origin device keeps the range allocated.
func (v *Volume) WriteZeroes(off, n int64) error {
	if err := v.check(off, n); err != nil {
		return err
	}
	switch v.kind {
	case KindSnapshot:
		return fmt.Errorf("%w: snapshot %d", ErrReadOnly, v.meta.id)
	case KindClone:
		return v.s.cloneWrite(v, nil, off, n, true)
	}
	bp := v.s.getBuf()
	defer v.s.putBuf(bp)
	zero := (*bp)[:v.s.cs]
	clear(zero)
	for n > 0 {
		k := min(n, v.s.cs)
		if err := v.s.originWrite(zero[:k], off, k, false); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}
