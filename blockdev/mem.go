package blockdev

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// memPage is the allocation unit of a Mem device. It is at least as large as
// the largest block size, so a block never straddles two pages and a write
// to one block is atomic under its shard's lock.
const memPage = 4096

const memShards = 64

// Mem is a RAM-backed, sparse Device: it costs memory only for the pages that
// hold data, so a 1 TiB Mem device is cheap until written. It is safe for
// concurrent use. Discarded and never-written ranges read as zeros and
// report as holes through MapAllocation.
type Mem struct {
	size   int64
	bs     int
	closed atomic.Bool
	shards [memShards]memShard

	lockMu    sync.Mutex // guards exclusive and shared (Lock, Unlock); taken alone
	exclusive bool       // an exclusive Lock is held
	shared    int        // shared Locks held
}

// memShard guards the pages whose index is congruent to its position modulo
// memShards: both the map and the bytes of every page in it.
type memShard struct {
	mu    sync.RWMutex
	pages map[int64]*[memPage]byte
}

// NewMem returns a zero-filled Mem device of size bytes with the given
// logical block size (512 or 4096). size must be a multiple of blockSize.
func NewMem(size int64, blockSize int) (*Mem, error) {
	if err := checkGeometry(size, blockSize); err != nil {
		return nil, err
	}
	m := &Mem{size: size, bs: blockSize}
	for i := range m.shards {
		m.shards[i].pages = make(map[int64]*[memPage]byte)
	}
	return m, nil
}

func checkGeometry(size int64, blockSize int) error {
	if blockSize != 512 && blockSize != 4096 {
		return fmt.Errorf("blockdev: block size %d: must be 512 or 4096: %w", blockSize, ErrNotSupported)
	}
	if size < 0 || size%int64(blockSize) != 0 {
		return fmt.Errorf("%w: size %d is not a multiple of block size %d", ErrMisaligned, size, blockSize)
	}
	return nil
}

func (m *Mem) shard(page int64) *memShard { return &m.shards[page%memShards] }

func (m *Mem) check(off, n int64) error {
	if m.closed.Load() {
		return ErrClosed
	}
	return CheckRange(off, n, m.size, m.bs)
}

// ReadAt implements Device.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		page, in := pos/memPage, int(pos%memPage)
		k := min(len(p)-done, memPage-in)
		s := m.shard(page)
		s.mu.RLock()
		if pg := s.pages[page]; pg != nil {
			copy(p[done:done+k], pg[in:in+k])
		} else {
			clear(p[done : done+k])
		}
		s.mu.RUnlock()
		done += k
	}
	return len(p), nil
}

// WriteAt implements Device.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		page, in := pos/memPage, int(pos%memPage)
		k := min(len(p)-done, memPage-in)
		s := m.shard(page)
		s.mu.Lock()
		pg := s.pages[page]
		if pg == nil {
			pg = new([memPage]byte)
			s.pages[page] = pg
		}
		copy(pg[in:in+k], p[done:done+k])
		s.mu.Unlock()
		done += k
	}
	return len(p), nil
}

// Flush implements Device; memory is as durable as it gets.
func (m *Mem) Flush() error {
	if m.closed.Load() {
		return ErrClosed
	}
	return nil
}

// Discard implements Device: whole pages are freed, partial ones zeroed.
func (m *Mem) Discard(off, n int64) error {
	if err := m.check(off, n); err != nil {
		return err
	}
	for n > 0 {
		page, in := off/memPage, off%memPage
		k := min(n, memPage-in)
		s := m.shard(page)
		s.mu.Lock()
		if pg := s.pages[page]; pg != nil {
			if k == memPage {
				delete(s.pages, page)
			} else {
				clear(pg[in : in+k])
			}
		}
		s.mu.Unlock()
		off += k
		n -= k
	}
	return nil
}

// MapAllocation implements AllocationMapper: pages never written or wholly
// discarded are holes.
func (m *Mem) MapAllocation(off, n int64) (int64, Allocation, error) {
	if err := m.check(off, n); err != nil {
		return 0, Allocated, err
	}
	if n == 0 {
		return 0, Allocated, nil
	}
	present := func(pos int64) bool {
		s := m.shard(pos / memPage)
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.pages[pos/memPage] != nil
	}
	first := present(off)
	length := int64(0)
	for length < n {
		pos := off + length
		if present(pos) != first {
			break
		}
		length += min(n-length, memPage-pos%memPage)
	}
	if first {
		return length, Allocated, nil
	}
	return length, Hole, nil
}

// Allocated returns the number of bytes of memory the device holds data in.
func (m *Mem) Allocated() int64 {
	var total int64
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.RLock()
		total += int64(len(s.pages)) * memPage
		s.mu.RUnlock()
	}
	return total
}

// Size implements Device.
func (m *Mem) Size() int64 { return m.size }

// BlockSize implements Device.
func (m *Mem) BlockSize() int { return m.bs }

// Close implements Device. The contents are released.
func (m *Mem) Close() error {
	if m.closed.Swap(true) {
		return ErrClosed
	}
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		s.pages = nil
		s.mu.Unlock()
	}
	return nil
}

// Clone returns an independent copy of the device's current contents (the
// copy shares no memory with m). Tests use it to freeze an image.
func (m *Mem) Clone() *Mem {
	c, _ := NewMem(m.size, m.bs) // m's geometry was validated when it was made
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.RLock()
		for k, pg := range s.pages {
			cp := *pg
			c.shards[i].pages[k] = &cp
		}
		s.mu.RUnlock()
	}
	return c
}
