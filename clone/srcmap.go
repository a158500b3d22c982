package clone

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// srcMap is the source's allocation, read ahead of background hydration
// when the source implements blockdev.AllocationMapper (a file through
// SEEK_HOLE, an NBD export through base:allocation). Regions wholly inside
// a hole or a zero extent are hydrated as metadata: the destination range
// is discarded (or zeroed) and nothing is read from the source. The source
// is read-only for the clone's lifetime, so a map once read stays true.
//
// One goroutine (run) walks the source from the start, at most ahead bytes
// in front of the dispatcher's scan, so that on a remote source the map's
// round trips overlap the copies instead of preceding each of them. If the
// mapper fails, the rest of the source is copied (all-zero regions are
// still found by looking at the data).
type srcMap struct {
	am    blockdev.AllocationMapper
	size  int64
	ahead int64  // the most bytes mapped ahead of the scan position
	kick  func() // wakes the dispatcher when the map grows

	moved chan struct{} // capacity 1: the scan position moved

	// mu guards the fields below. Lock order: hydrator.mu, Clone.io.mu,
	// then mu.
	mu     sync.Mutex
	exts   []extent // contiguous and sorted, covering [base, mapped)
	base   int64
	mapped int64
	scan   int64 // the dispatcher's scan position; extents below it are dropped
	err    error // the mapper stopped on this error
}

// extent is a run of the source in one allocation state.
type extent struct {
	off, end int64
	state    blockdev.Allocation
}

// mapQuery is the longest range asked of MapAllocation at once.
const mapQuery = 1 << 30

// mapAhead is how far the mapper reads ahead of the scan.
const mapAhead = 1 << 30

// maxExtents bounds the extents kept ahead, whatever their size (a source
// fragmented into 4 KiB extents must not grow the map without bound).
const maxExtents = 1 << 16

func newSrcMap(src blockdev.Device, kick func()) *srcMap {
	am, ok := src.(blockdev.AllocationMapper)
	if !ok {
		return nil
	}
	return &srcMap{am: am, size: src.Size(), ahead: mapAhead, kick: kick, moved: make(chan struct{}, 1)}
}

// run maps the source until it is all mapped, an error stops it, or ctx
// ends.
func (m *srcMap) run(ctx context.Context) {
	for {
		m.mu.Lock()
		off, full := m.mapped, m.mapped-m.scan >= m.ahead || len(m.exts) >= maxExtents
		m.mu.Unlock()
		if off >= m.size {
			return
		}
		if full {
			select {
			case <-ctx.Done():
				return
			case <-m.moved:
			}
			continue
		}
		n, st, err := m.am.MapAllocation(off, min(m.size-off, mapQuery))
		if err == nil && (n <= 0 || n > m.size-off) {
			err = fmt.Errorf("allocation map at %d: length %d", off, n)
		}
		m.mu.Lock()
		if err != nil {
			m.err = err
		} else {
			m.add(extent{off: off, end: off + n, state: st})
		}
		m.mu.Unlock()
		m.kick()
		if err != nil || ctx.Err() != nil {
			return
		}
	}
}

// add appends an extent, merging it with the last one of the same state.
// Called with mu held.
func (m *srcMap) add(e extent) {
	if k := len(m.exts); k > 0 && m.exts[k-1].state == e.state && m.exts[k-1].end == e.off {
		m.exts[k-1].end = e.end
	} else {
		m.exts = append(m.exts, e)
	}
	m.mapped = e.end
}

// lookup returns the extent holding off. known is false while the mapper
// has not reached off yet (the caller waits for it); a position the map
// does not cover otherwise (dropped behind the scan, or past a mapping
// error) is reported as allocated to the end of the source.
func (m *srcMap) lookup(off int64) (e extent, known bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= m.mapped && m.err == nil && m.mapped < m.size {
		return extent{}, false
	}
	if off < m.base || off >= m.mapped {
		return extent{off: off, end: m.size, state: blockdev.Allocated}, true
	}
	i := sort.Search(len(m.exts), func(i int) bool { return m.exts[i].end > off })
	return m.exts[i], true
}

// advance moves the scan position to off: extents wholly below it are
// dropped, and the mapper may read further ahead. A scan that starts over
// (off below the current position) keeps the map as it is.
func (m *srcMap) advance(off int64) {
	m.mu.Lock()
	if off <= m.scan {
		m.mu.Unlock()
		return
	}
	m.scan = off
	i := sort.Search(len(m.exts), func(i int) bool { return m.exts[i].end > off })
	if i > 0 {
		m.base = m.exts[i-1].end
		// Re-slicing leaves the dropped head to the next append's
		// reallocation: no copy per advance.
		m.exts = m.exts[i:]
	}
	m.mu.Unlock()
	select {
	case m.moved <- struct{}{}:
	default:
	}
}

// failed returns the error that stopped the mapper, if any.
func (m *srcMap) failed() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}
