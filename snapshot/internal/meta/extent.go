package meta

// Extents: the metadata region grown into data chunks.
//
// The region starts as one run of pages on the Meta's device (the base).
// GrowFromData adds an extent: a run of free data chunks, taken from the
// top of the data space map, whose bytes on Options.Outer become metadata
// pages numbered after the last one. The chunks stay marked in use in the
// data space map for good, so nothing else allocates them, and the
// superblock lists the extents after its index pointers (super.go):
//
//	offset        size field
//	160+16(m+d)+16k  8 first data chunk of extent k
//	      +8         8 data chunks in extent k
//
// with their count at bytes 148..151. A superblock with extents has format
// version 3; one without is written as version 2, so a region that never
// grew stays readable by the code before extents.
//
// Crash safety: an extent, its chunks' bits in the data map and the grown
// metadata map are changes of one transaction, durable together when its
// superblock is. Until then the chunks are free in every durable state, so
// pages the open transaction writes there early (write-back) land on free
// space, which a crash simply leaves free. Chunks that are held (freed by
// a transaction not yet durable, or read by a view) are never taken.

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/blocksnap/blocksnap/blockdev"
)

// maxExtents bounds the extents a region may gain (each takes a slot of
// the superblock's pointer area).
const maxExtents = 64

// extent is a run of data chunks that holds metadata pages [start,
// start+pages).
type extent struct {
	chunk, chunks uint64
	start, pages  uint64
}

// layout maps page numbers to devices: pages below base are on the Meta's
// device, the rest in the extents, in order. A layout is never changed
// once published (GrowFromData publishes a new one), so readers load it
// without a lock.
type layout struct {
	base uint64
	ext  []extent
}

// locate returns the device and byte offset of page loc.
func (m *Meta) locate(loc uint64) (blockdev.Device, int64) {
	dev, off, _ := m.locateRun(loc)
	return dev, off
}

// locateRun is locate that also returns the page past the part of the
// region that holds loc, whose pages lie at consecutive offsets of dev
// (loc+1 for a page past the region).
func (m *Meta) locateRun(loc uint64) (dev blockdev.Device, off int64, end uint64) {
	l := m.layout.Load()
	if l == nil || loc < l.base {
		end = uint64(math.MaxUint64)
		if l != nil {
			end = l.base
		}
		return m.dev, int64(loc) * PageSize, end
	}
	for _, e := range l.ext {
		if loc < e.start+e.pages {
			return m.opts.Outer, m.opts.DataOff + int64(e.chunk)*m.opts.ChunkBytes + int64(loc-e.start)*PageSize, e.start + e.pages
		}
	}
	return m.dev, int64(loc) * PageSize, loc + 1 // past the region: the device refuses it
}

// extentsOf returns the current extents (nil: none).
func (m *Meta) extentsOf() []extent {
	if l := m.layout.Load(); l != nil {
		return l.ext
	}
	return nil
}

// pagesPerChunk is how many metadata pages a data chunk holds.
func (m *Meta) pagesPerChunk() (uint64, error) {
	cb := m.opts.ChunkBytes
	if m.opts.Outer == nil || cb < PageSize || cb%PageSize != 0 || m.opts.DataOff < 0 {
		return 0, fmt.Errorf("meta: the region has no outer device to grow into (chunk %d bytes): %w", cb, ErrInvalid)
	}
	return uint64(cb / PageSize), nil
}

// setLayout builds and publishes the layout of a region of pages pages
// with extents ext, checking them against the data map and the outer
// device. Called at Open (before the Meta is shared) and by GrowFromData
// with mu held.
func (m *Meta) setLayout(pages, dataChunks uint64, ext []extent) error {
	if len(ext) == 0 {
		m.layout.Store(&layout{base: pages})
		return nil
	}
	per, err := m.pagesPerChunk()
	if err != nil {
		return err
	}
	total := uint64(0)
	for i := range ext {
		e := &ext[i]
		if e.chunks == 0 || e.chunk+e.chunks > dataChunks || e.chunk+e.chunks < e.chunk || e.chunks > (1<<40)/per {
			return fmt.Errorf("meta: %w: extent %d (chunks %d+%d) outside the %d data chunks", ErrCorrupt, i, e.chunk, e.chunks, dataChunks)
		}
		for _, f := range ext[:i] {
			if e.chunk < f.chunk+f.chunks && f.chunk < e.chunk+e.chunks {
				return fmt.Errorf("meta: %w: extents at chunks %d and %d overlap", ErrCorrupt, f.chunk, e.chunk)
			}
		}
		e.pages = e.chunks * per
		total += e.pages
	}
	if total+3 > pages {
		return fmt.Errorf("meta: %w: extents hold %d of the region's %d pages", ErrCorrupt, total, pages)
	}
	base := pages - total
	if base > uint64(m.dev.Size())/PageSize {
		return fmt.Errorf("meta: %w: the region's first %d pages do not fit its device (%d bytes)", ErrCorrupt, base, m.dev.Size())
	}
	start := base
	for i := range ext {
		ext[i].start = start
		start += ext[i].pages
	}
	last := ext[len(ext)-1]
	if end := m.opts.DataOff + int64(last.chunk+last.chunks)*m.opts.ChunkBytes; end > m.opts.Outer.Size() {
		return fmt.Errorf("meta: %w: extent at chunk %d ends at byte %d, past the outer device (%d bytes)", ErrCorrupt, last.chunk, end, m.opts.Outer.Size())
	}
	m.layout.Store(&layout{base: base, ext: ext})
	return nil
}

// GrowFromData grows the region by chunks data chunks: it takes the
// highest run of that many free data chunks (neither in use nor held),
// marks them in use and makes their bytes on Options.Outer the region's
// next pages. The change is durable, atomically, with the next commit. It
// returns the first chunk of the run. ErrNoSpace: no such run is free.
func (m *Meta) GrowFromData(chunks uint64) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return 0, err
	}
	per, err := m.pagesPerChunk()
	if err != nil {
		return 0, err
	}
	old := m.extentsOf()
	if chunks == 0 || chunks > (1<<40)/per {
		return 0, fmt.Errorf("meta: grow by %d data chunks: %w", chunks, ErrInvalid)
	}
	if len(old) >= maxExtents {
		return 0, fmt.Errorf("meta: the region has %d extents already: %w", len(old), ErrInvalid)
	}
	pages := m.metaSM.nbits + chunks*per
	if idxFor(pagesFor(pages))+idxFor(pagesFor(m.dataSM.nbits))+len(old)+1 > maxIdxPtrs {
		return 0, fmt.Errorf("meta: %d pages and %d chunks need more pointers than the superblock holds: %w", pages, m.dataSM.nbits, ErrInvalid)
	}
	first, ok, err := m.dataSM.freeRunFromTop(chunks)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("meta: no run of %d free data chunks: %w", chunks, ErrNoSpace)
	}
	// The run's bits first: setting them may read pages back, which may
	// fail; then nothing else has changed, and the bits set so far are
	// cleared again (restoreBit).
	for i := first; i < first+chunks; i++ {
		if err := m.dataSM.set(i); err != nil {
			for j := first; j < i; j++ {
				m.restoreBit(j, false)
			}
			return 0, err
		}
	}
	ext := append(append(make([]extent, 0, len(old)+1), old...), extent{chunk: first, chunks: chunks})
	if err := m.setLayout(pages, m.dataSM.nbits, ext); err != nil {
		for j := first; j < first+chunks; j++ {
			m.restoreBit(j, false)
		}
		return 0, err
	}
	m.metaSM.grow(pages) // never paged out: no error
	m.changed = true
	m.lowFired = false
	return first, nil
}

// metaChunks counts the data chunks the extents hold.
func metaChunks(ext []extent) uint64 {
	n := uint64(0)
	for _, e := range ext {
		n += e.chunks
	}
	return n
}

// freeRunFromTop finds the highest run of n bits that are neither set nor
// held: a page with neither at once, the others bit by bit (a grow is
// rare, and this is O(map) once). It reads paged-out pages back.
func (s *spaceMap) freeRunFromTop(n uint64) (uint64, bool, error) {
	run := uint64(0)
	for pi := uint64(len(s.words)); pi > 0; pi-- {
		lo, pb := (pi-1)*bitsPerPage, s.pageBits(pi-1)
		if s.setN[pi-1] == 0 && s.held[pi-1] == nil {
			if run += pb; run >= n {
				return lo + run - n, true, nil
			}
			continue
		}
		p, err := s.bitsOf(pi - 1)
		if err != nil {
			return 0, false, err
		}
		for c := lo + pb; c > lo; c-- {
			i := c - 1
			if p[(i/64)%wordsPerPage]&(1<<(i%64)) != 0 || s.isHeld(i) {
				run = 0
				continue
			}
			if run++; run == n {
				return i, true, nil
			}
		}
	}
	return 0, false, nil
}

// encodeExtents writes the extents after the superblock's index pointers
// at p[off:], and their count at bytes 148..151.
func encodeExtents(p []byte, off int, ext []extent) {
	le := binary.LittleEndian
	le.PutUint32(p[148:], uint32(len(ext)))
	for i, e := range ext {
		le.PutUint64(p[off+16*i:], e.chunk)
		le.PutUint64(p[off+16*i+8:], e.chunks)
	}
}

// decodeExtents reads n extents at p[off:] (decodeSuper checked they fit).
func decodeExtents(p []byte, off, n int) []extent {
	le := binary.LittleEndian
	ext := make([]extent, n)
	for i := range ext {
		ext[i] = extent{chunk: le.Uint64(p[off+16*i:]), chunks: le.Uint64(p[off+16*i+8:])}
	}
	return ext
}

// flushDev flushes the region's devices: Outer once the region has
// extents (the Meta's device is a part of it), else the Meta's device.
func (m *Meta) flushDev() error {
	if len(m.extentsOf()) > 0 {
		return m.opts.Outer.Flush()
	}
	return m.dev.Flush()
}
