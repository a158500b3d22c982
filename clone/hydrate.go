package clone

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Background hydration. One dispatcher goroutine picks batches of
// contiguous unhydrated regions (regions hinted by user reads first, then a
// scan from a cursor) and starts a copy for each, keeping at most
// threshold regions in flight (one batch while user reads of the source are
// in progress: it yields to them). A copy reads the source in large chunks;
// an all-zero region becomes a destination Discard instead of a write. A
// failed copy releases its regions and makes the dispatcher back off
// (RetryMin doubling to RetryMax) before it starts anything else: a dead
// source costs one attempt per backoff period, never a busy loop, and the
// error is reported through Status and the progress callback.

const maxHints = 256

// batch is a claimed run of regions [r0, r0+n).
type batch struct {
	r0, n uint64
	f     *flight
}

type hydrator struct {
	c    *Clone
	wake chan struct{} // capacity 1: something changed, look again

	copied, skipped atomic.Int64 // bytes copied from the source; hydrated without a copy

	mu        sync.Mutex // guards the fields below; taken before Clone.io.mu
	paused    bool
	threshold int   // regions in flight at most
	rate      int64 // bytes/s, 0 = unlimited
	tokens    float64
	tokensAt  time.Time
	inflight  int // regions claimed by background copies
	cursor    uint64
	hints     []uint64
	failures  int           // consecutive failed copies
	backoff   time.Duration // wait owed before the next copy
	lastErr   error
	errs      int64
	closed    bool
	rateMark  time.Time // start of the current rate measurement
	rateBytes int64     // hydrated bytes at rateMark
	reported  time.Time
	lastState State
}

func newHydrator(c *Clone) *hydrator {
	t := c.opts.HydrationThreshold
	if t <= 0 {
		t = 4 * c.batch
	}
	h := &hydrator{c: c, wake: make(chan struct{}, 1), paused: c.opts.NoHydration, threshold: t, rate: c.opts.RateLimit}
	h.tokensAt = time.Now()
	h.rateMark = h.tokensAt
	h.rateBytes = h.hydratedBytes()
	h.lastState = -1
	return h
}

// kick wakes the dispatcher; it never blocks.
func (h *hydrator) kick() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

func (h *hydrator) addCopied(n int64)  { h.copied.Add(n) }
func (h *hydrator) addSkipped(n int64) { h.skipped.Add(n) }

// hint asks for region r to be hydrated early: a user read it from the
// source.
func (h *hydrator) hint(r uint64) {
	h.mu.Lock()
	if len(h.hints) < maxHints && (len(h.hints) == 0 || h.hints[len(h.hints)-1] != r) {
		h.hints = append(h.hints, r)
	}
	h.mu.Unlock()
	h.kick()
}

func (h *hydrator) after(d time.Duration) <-chan time.Time {
	if f := h.c.opts.testAfter; f != nil {
		return f(d)
	}
	return time.After(d)
}

// run is the dispatcher; it returns when the clone closes or every region
// is hydrated, after waiting for its copies.
func (h *hydrator) run() {
	ctx := h.c.ctx
	var g errgroup.Group
	defer g.Wait()
	for {
		h.report()
		if ctx.Err() != nil {
			return
		}
		if h.c.md.allHydrated() {
			return
		}
		b, wait, ok := h.next()
		if ok {
			g.Go(func() error {
				h.copyBatch(ctx, b)
				return nil
			})
			continue
		}
		var timer <-chan time.Time
		if wait > 0 {
			timer = h.after(wait)
		}
		select {
		case <-ctx.Done():
			return
		case <-h.wake:
		case <-timer:
		case <-h.c.md.waitDone():
		}
	}
}

// next claims the next batch, or says how long to wait (0: until woken).
func (h *hydrator) next() (batch, time.Duration, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.paused {
		return batch{}, 0, false
	}
	if h.backoff > 0 {
		d := h.backoff
		h.backoff = 0
		return batch{}, d, false
	}
	limit := h.threshold
	if h.c.userSrc.Load() > 0 {
		limit = min(limit, h.c.batch)
	}
	if h.inflight >= limit {
		return batch{}, 0, false
	}
	if h.rate > 0 {
		now := time.Now()
		burst := float64(h.c.bufSize)
		h.tokens = min(burst, h.tokens+float64(h.rate)*now.Sub(h.tokensAt).Seconds())
		h.tokensAt = now
		if h.tokens < 0 {
			return batch{}, time.Duration(-h.tokens / float64(h.rate) * float64(time.Second)), false
		}
	}
	room := min(h.c.batch, limit-h.inflight)
	b, ok := h.claimBatch(uint64(room))
	if !ok {
		return batch{}, 0, false
	}
	h.inflight += int(b.n)
	if h.rate > 0 {
		h.tokens -= float64(h.c.regionEnd(b.r0+b.n-1) - h.c.regionStart(b.r0))
	}
	return b, 0, true
}

// claimBatch claims up to room contiguous unhydrated regions not in
// flight: at a hinted region if there is one, else from the cursor on.
func (h *hydrator) claimBatch(room uint64) (batch, bool) {
	c := h.c
	c.io.Lock()
	defer c.io.Unlock()
	for len(h.hints) > 0 {
		r := h.hints[0]
		h.hints = h.hints[1:]
		if b, ok := h.claimRun(r, room); ok {
			return b, true
		}
	}
	for _, from := range []uint64{h.cursor, 0} {
		for r, ok := c.md.nextUnhydrated(from); ok; r, ok = c.md.nextUnhydrated(r + 1) {
			if b, ok := h.claimRun(r, room); ok {
				h.cursor = b.r0 + b.n
				if h.cursor >= c.geo.Regions {
					h.cursor = 0
				}
				return b, true
			}
		}
	}
	return batch{}, false
}

// claimRun claims the run of unhydrated, unclaimed regions starting at r,
// at most room long. Called with c.io held.
func (h *hydrator) claimRun(r, room uint64) (batch, bool) {
	c := h.c
	free := func(r uint64) bool { return r < c.geo.Regions && c.io.flights[r] == nil && !c.md.test(r) }
	if !free(r) {
		return batch{}, false
	}
	b := batch{r0: r, f: &flight{done: make(chan struct{})}}
	for b.n < room && free(r+b.n) {
		c.io.flights[r+b.n] = b.f
		b.n++
	}
	return b, true
}

// copyBatch copies a claimed batch and releases it.
func (h *hydrator) copyBatch(ctx context.Context, b batch) {
	c := h.c
	bp := c.getBuf()
	err := c.copyRange(ctx, *bp, c.regionStart(b.r0), c.regionEnd(b.r0+b.n-1))
	c.putBuf(bp)
	c.release(b.f, b.r0, b.r0+b.n-1, err == nil)
	// Wake the dispatcher after inflight drops (release's wake-up may have
	// been consumed while it was still counted).
	defer h.kick()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inflight -= int(b.n)
	switch {
	case err == nil:
		h.failures = 0
	case ctx.Err() != nil:
		// Closing: not a failure.
	default:
		h.failures++
		h.errs++
		h.lastErr = err
		d := c.opts.RetryMin << min(h.failures-1, 30)
		if d <= 0 || d > c.opts.RetryMax {
			d = c.opts.RetryMax
		}
		h.backoff = max(h.backoff, d)
	}
}

// copyRange copies [lo, hi) from the source to the destination through
// buf, in chunks of len(buf). Within a chunk, runs of all-zero regions are
// discarded on the destination and runs of data regions written with one
// call each.
func (c *Clone) copyRange(ctx context.Context, buf []byte, lo, hi int64) error {
	for off := lo; off < hi; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf)), hi-off)
		chunk := buf[:n]
		if _, err := c.src.ReadAt(chunk, off); err != nil {
			return hydrateErr("read source", off, n, err)
		}
		unit := min(c.geo.RegionSize, n)
		for i := int64(0); i < n; {
			zero := blockdev.IsZero(chunk[i:min(i+unit, n)])
			j := min(i+unit, n)
			for j < n && blockdev.IsZero(chunk[j:min(j+unit, n)]) == zero {
				j = min(j+unit, n)
			}
			if zero {
				if err := discardOrZero(c.dst, off+i, j-i); err != nil {
					return hydrateErr("discard destination", off+i, j-i, err)
				}
				c.hyd.addSkipped(j - i)
			} else {
				if _, err := c.dst.WriteAt(chunk[i:j], off+i); err != nil {
					return hydrateErr("write destination", off+i, j-i, err)
				}
				c.hyd.addCopied(j - i)
			}
			i = j
		}
		off += n
	}
	return nil
}

func hydrateErr(what string, off, n int64, err error) error {
	return fmt.Errorf("clone: hydrate: %s at %d+%d: %w", what, off, n, err)
}

// Pause stops background hydration after the copies in flight; user I/O
// still hydrates the regions it writes.
func (c *Clone) Pause() {
	c.hyd.mu.Lock()
	c.hyd.paused = true
	c.hyd.mu.Unlock()
	c.hyd.kick()
}

// Resume restarts background hydration (also after Options.NoHydration).
func (c *Clone) Resume() {
	h := c.hyd
	h.mu.Lock()
	if h.paused {
		h.paused = false
		h.rateMark, h.rateBytes = time.Now(), h.hydratedBytes()
	}
	h.mu.Unlock()
	h.kick()
}

// SetThreshold sets the most regions background hydration keeps in flight
// (at least 1).
func (c *Clone) SetThreshold(regions int) {
	c.hyd.mu.Lock()
	c.hyd.threshold = max(1, regions)
	c.hyd.mu.Unlock()
	c.hyd.kick()
}

// SetRateLimit caps background hydration at bytesPerSecond (0: no cap).
func (c *Clone) SetRateLimit(bytesPerSecond int64) {
	c.hyd.mu.Lock()
	c.hyd.rate = max(0, bytesPerSecond)
	c.hyd.tokens, c.hyd.tokensAt = 0, time.Now()
	c.hyd.mu.Unlock()
	c.hyd.kick()
}

// Done returns a channel closed when every region is hydrated: from then
// on the destination alone holds the volume.
func (c *Clone) Done() <-chan struct{} { return c.md.waitDone() }

// Wait waits until every region is hydrated, ctx is done or the clone is
// closed (ErrClosed).
func (c *Clone) Wait(ctx context.Context) error {
	select {
	case <-c.md.waitDone():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ctx.Done():
		select {
		case <-c.md.waitDone():
			return nil
		default:
		}
		return errClosed("wait")
	}
}

// step claims one batch of at most n regions and copies it synchronously,
// whatever the dispatcher is doing: hydration driven one step at a time
// (tests use it to interleave hydration with I/O deterministically). It
// returns the number of regions hydrated.
func (h *hydrator) step(ctx context.Context, n uint64) (uint64, error) {
	c := h.c
	h.mu.Lock()
	b, ok := h.claimBatch(max(1, n))
	h.mu.Unlock()
	if !ok {
		return 0, nil
	}
	bp := c.getBuf()
	err := c.copyRange(ctx, *bp, c.regionStart(b.r0), c.regionEnd(b.r0+b.n-1))
	c.putBuf(bp)
	c.release(b.f, b.r0, b.r0+b.n-1, err == nil)
	if err != nil {
		return 0, err
	}
	return b.n, nil
}
