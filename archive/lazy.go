package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// LazyOptions configures OpenLazy.
type LazyOptions struct {
	// CacheDir holds the cache file (removed on Close); "" keeps the
	// cache in memory.
	CacheDir string
	// CacheSize bounds the cache in bytes (whole blocks, at least 8);
	// 0 means 256 MiB.
	CacheSize int64
	// Prefetch is how many blocks past a sequential run are fetched ahead
	// in the background; 0 means 4, negative none.
	Prefetch int
}

// Image is a read-only Device over a backup that fetches blocks from the
// repository when they are first read (instant restore). Fetched blocks
// are verified against their hashes and kept in a bounded cache, evicted
// by the clock algorithm. Zero blocks are never fetched and MapAllocation
// reports them as holes. It is safe for concurrent use.
//
// The context given to Open bounds every fetch for the image's life: once
// it is cancelled or past its deadline, reads of blocks not in the cache
// fail with an error wrapping blockdev.ErrIO and the context's error.
type Image struct {
	r     *Repo
	m     *Manifest
	ctx   context.Context
	stop  context.CancelFunc
	devBS int
	bs    int64

	cache     io.ReaderAt
	cacheW    io.WriterAt
	cacheFile *os.File // nil for a memory cache
	bufs      sync.Pool
	prefetch  int
	sem       chan struct{} // bounds background fetches in flight
	wg        sync.WaitGroup
	closed    atomic.Bool

	// mu guards slotOf, slots, hand, fetching and last, and orders wg.Add
	// against Close. It is never held
	// across I/O; no other lock is taken under it.
	mu       sync.Mutex
	slotOf   []int32 // per block: its cache slot, or -1
	slots    []slot
	hand     int
	fetching map[int]*fetchOp
	last     int // the last block of the previous read, for sequential detection

	hits, misses, fetched atomic.Int64
}

type slot struct {
	block int   // -1 when empty
	pins  int32 // readers copying out of it; a pinned slot is not evicted
	ref   bool  // clock bit
}

type fetchOp struct {
	done chan struct{}
	err  error
}

// ImageStats counts cache behaviour.
type ImageStats struct {
	Hits, Misses int64 // block lookups served from the cache, and fetched
	FetchedBytes int64 // stored bytes downloaded
}

// Open opens backup id lazily with a cache in cacheDir ("" for memory) and
// the default LazyOptions otherwise.
func Open(ctx context.Context, r *Repo, id, cacheDir string) (*Image, error) {
	return OpenLazy(ctx, r, id, LazyOptions{CacheDir: cacheDir})
}

// OpenLazy opens backup id as a read-only Device. See Image.
func OpenLazy(ctx context.Context, r *Repo, id string, o LazyOptions) (*Image, error) {
	m, err := r.Manifest(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := r.refreshIndex(ctx); err != nil {
		return nil, err
	}
	bs := int64(m.BlockSize)
	size := o.CacheSize
	if size == 0 {
		size = 256 << 20
	}
	nslots := max(size/bs, 8)
	im := &Image{r: r, m: m, devBS: m.DevBlock, bs: bs, prefetch: o.Prefetch,
		slotOf: make([]int32, len(m.Blocks)), slots: make([]slot, nslots),
		fetching: make(map[int]*fetchOp), last: -2, sem: make(chan struct{}, 8)}
	if im.prefetch == 0 {
		im.prefetch = 4
	}
	for i := range im.slotOf {
		im.slotOf[i] = -1
	}
	for i := range im.slots {
		im.slots[i].block = -1
	}
	if o.CacheDir != "" {
		f, err := os.CreateTemp(o.CacheDir, "blocksnap-archive-*.cache")
		if err != nil {
			return nil, fmt.Errorf("archive: cache: %w", err)
		}
		im.cacheFile, im.cache, im.cacheW = f, f, f
	} else {
		mem := &memCache{b: make([]byte, nslots*bs)}
		im.cache, im.cacheW = mem, mem
	}
	im.ctx, im.stop = context.WithCancel(ctx)
	return im, nil
}

// Manifest is the backup's manifest.
func (im *Image) Manifest() *Manifest { return im.m }

// Stats reports the cache's counters.
func (im *Image) Stats() ImageStats {
	return ImageStats{Hits: im.hits.Load(), Misses: im.misses.Load(), FetchedBytes: im.fetched.Load()}
}

// Size implements blockdev.Device.
func (im *Image) Size() int64 { return im.m.Size }

// BlockSize implements blockdev.Device: the backed-up volume's block size.
func (im *Image) BlockSize() int { return im.devBS }

// ReadAt implements blockdev.Device.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if im.closed.Load() {
		return 0, blockdev.ErrClosed
	}
	if err := blockdev.CheckRange(off, int64(len(p)), im.m.Size, im.devBS); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	first, lastB := int(off/im.bs), int((off+int64(len(p))-1)/im.bs)
	if lastB > first {
		// A read of several blocks fetches them in parallel while it
		// copies out the first.
		im.fetchAhead(first+1, lastB)
	}
	im.maybePrefetch(first, lastB)
	done := 0
	for b := first; b <= lastB; b++ {
		bo := (off + int64(done)) - int64(b)*im.bs
		n := int(min(im.bs-bo, int64(len(p)-done)))
		if err := im.readBlock(p[done:done+n], b, bo); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

func (im *Image) readBlock(p []byte, b int, bo int64) error {
	if im.m.Blocks[b].IsZero() {
		clear(p)
		return nil
	}
	s, data, err := im.acquire(b)
	if err != nil {
		return err
	}
	if data != nil { // no free slot: served from the fetch buffer
		copy(p, (*data)[bo:])
		im.bufs.Put(data)
		return nil
	}
	_, err = im.cache.ReadAt(p, int64(s)*im.bs+bo)
	im.mu.Lock()
	im.slots[s].pins--
	im.mu.Unlock()
	if err != nil {
		return fmt.Errorf("archive: cache read: %w: %w", blockdev.ErrIO, err)
	}
	return nil
}

// acquire returns block b's cache slot, pinned, fetching the block first if
// needed; or, if every slot is pinned, the block's contents in a pooled
// buffer the caller puts back.
func (im *Image) acquire(b int) (int, *[]byte, error) {
	im.mu.Lock()
	for {
		if s := im.slotOf[b]; s >= 0 {
			im.slots[s].pins++
			im.slots[s].ref = true
			im.mu.Unlock()
			im.hits.Add(1)
			return int(s), nil, nil
		}
		f := im.fetching[b]
		if f == nil {
			break
		}
		im.mu.Unlock()
		<-f.done
		if f.err != nil {
			return 0, nil, f.err
		}
		im.mu.Lock()
	}
	f := &fetchOp{done: make(chan struct{})}
	im.fetching[b] = f
	im.mu.Unlock()
	im.misses.Add(1)

	s, data, err := im.load(b)
	im.mu.Lock()
	delete(im.fetching, b)
	if err == nil && data == nil {
		im.slotOf[b] = int32(s)
	}
	im.mu.Unlock()
	f.err = err
	close(f.done)
	return s, data, err
}

// load fetches block b and puts it in a free slot (pinned for the caller),
// or returns it in a buffer when no slot is free.
func (im *Image) load(b int) (int, *[]byte, error) {
	bp, _ := im.bufs.Get().(*[]byte)
	if bp == nil {
		buf := make([]byte, 0, im.bs)
		bp = &buf
	}
	plain, stored, err := im.r.fetchBlock(im.ctx, im.m, b, (*bp)[:0])
	if errors.Is(err, ErrNotFound) && im.r.refreshIndex(im.ctx) == nil {
		// A GC may have moved the block to another pack since Open.
		plain, stored, err = im.r.fetchBlock(im.ctx, im.m, b, (*bp)[:0])
	}
	if err != nil {
		im.bufs.Put(bp)
		if ctxErr := im.ctx.Err(); ctxErr != nil {
			return 0, nil, fmt.Errorf("archive: fetch block %d: %w: %w", b, blockdev.ErrIO, context.Cause(im.ctx))
		}
		return 0, nil, fmt.Errorf("archive: fetch block %d: %w: %w", b, blockdev.ErrIO, err)
	}
	*bp = plain
	im.fetched.Add(int64(stored))
	im.mu.Lock()
	s := im.evict()
	if s >= 0 {
		im.slots[s] = slot{block: b, pins: 1, ref: true}
	}
	im.mu.Unlock()
	if s < 0 {
		return 0, bp, nil
	}
	_, err = im.cacheW.WriteAt(plain, int64(s)*im.bs)
	if err != nil {
		im.mu.Lock()
		im.slots[s] = slot{block: -1}
		im.mu.Unlock()
		return 0, bp, nil // the cache failed; the reader still gets the data
	}
	im.bufs.Put(bp)
	return s, nil, nil
}

// evict frees a slot by the clock algorithm and returns it, or -1 if every
// slot is pinned. Called with mu held.
func (im *Image) evict() int {
	for range 2 * len(im.slots) {
		s := im.hand
		im.hand = (im.hand + 1) % len(im.slots)
		sl := &im.slots[s]
		if sl.pins > 0 {
			continue
		}
		if sl.ref {
			sl.ref = false
			continue
		}
		if sl.block >= 0 {
			im.slotOf[sl.block] = -1
		}
		sl.block = -1
		return s
	}
	return -1
}

// maybePrefetch starts background fetches of the blocks after lastB when
// this read continues the previous one.
func (im *Image) maybePrefetch(first, lastB int) {
	if im.prefetch < 0 {
		return
	}
	im.mu.Lock()
	seq := first == im.last || first == im.last+1
	im.last = lastB
	im.mu.Unlock()
	if seq {
		im.fetchAhead(lastB+1, min(lastB+im.prefetch, len(im.m.Blocks)-1))
	}
}

// fetchAhead starts background fetches of the blocks in [from, to] that are
// neither cached nor being fetched, as many as the semaphore allows.
func (im *Image) fetchAhead(from, to int) {
	for b := from; b <= to; b++ {
		if im.m.Blocks[b].IsZero() {
			continue
		}
		select {
		case im.sem <- struct{}{}:
		default:
			return // enough in flight
		}
		// Under mu, so that Close (which takes mu after setting closed and
		// before waiting) never races an Add with its Wait.
		im.mu.Lock()
		busy := im.slotOf[b] >= 0 || im.fetching[b] != nil || im.closed.Load()
		if !busy {
			im.wg.Add(1)
		}
		im.mu.Unlock()
		if busy {
			<-im.sem
			continue
		}
		go func() {
			defer im.wg.Done()
			defer func() { <-im.sem }()
			s, data, err := im.acquire(b)
			if err != nil {
				return // a reader that needs the block will see the error itself
			}
			if data != nil {
				im.bufs.Put(data)
				return
			}
			im.mu.Lock()
			im.slots[s].pins--
			im.mu.Unlock()
		}()
	}
}

// MapAllocation implements blockdev.AllocationMapper: zero blocks are holes.
func (im *Image) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if im.closed.Load() {
		return 0, 0, blockdev.ErrClosed
	}
	if err := blockdev.CheckRange(off, n, im.m.Size, im.devBS); err != nil {
		return 0, 0, err
	}
	if n == 0 {
		return 0, 0, fmt.Errorf("archive: map allocation of 0 bytes: %w", blockdev.ErrOutOfRange)
	}
	b := int(off / im.bs)
	zero := im.m.Blocks[b].IsZero()
	end := min((int64(b)+1)*im.bs, off+n)
	for b++; end < off+n && im.m.Blocks[b].IsZero() == zero; b++ {
		end = min((int64(b)+1)*im.bs, off+n)
	}
	state := blockdev.Allocated
	if zero {
		state = blockdev.Hole
	}
	return end - off, state, nil
}

// WriteAt implements blockdev.Device: the image is read-only.
func (im *Image) WriteAt(p []byte, off int64) (int, error) { return 0, im.readOnly() }

// Discard implements blockdev.Device: the image is read-only.
func (im *Image) Discard(off, n int64) error { return im.readOnly() }

// Flush implements blockdev.Device; there is nothing to make durable.
func (im *Image) Flush() error {
	if im.closed.Load() {
		return blockdev.ErrClosed
	}
	return nil
}

func (im *Image) readOnly() error {
	if im.closed.Load() {
		return blockdev.ErrClosed
	}
	return blockdev.ErrReadOnly
}

// Close stops the prefetches, waits for them and drops the cache.
func (im *Image) Close() error {
	im.mu.Lock() // under mu: see maybePrefetch
	already := im.closed.Swap(true)
	im.mu.Unlock()
	if already {
		return blockdev.ErrClosed
	}
	im.stop()
	im.wg.Wait()
	if im.cacheFile != nil {
		name := im.cacheFile.Name()
		err := im.cacheFile.Close()
		if rerr := os.Remove(name); err == nil && !errors.Is(rerr, os.ErrNotExist) {
			err = rerr
		}
		return err
	}
	return nil
}

// memCache is the in-memory cache: one slab of slots.
type memCache struct{ b []byte }

func (c *memCache) ReadAt(p []byte, off int64) (int, error)  { return copy(p, c.b[off:]), nil }
func (c *memCache) WriteAt(p []byte, off int64) (int, error) { return copy(c.b[off:], p), nil }
