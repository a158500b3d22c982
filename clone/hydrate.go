package clone

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Background hydration. One dispatcher goroutine picks runs of unhydrated
// regions (regions hinted by user reads first, then a scan from a cursor)
// and starts a job for each:
//
//   - a skip: a run of regions wholly inside a hole or zero extent of the
//     source (srcmap.go) is hydrated as metadata, a destination Discard or
//     WriteZeroes, with nothing read;
//   - a copy: a batch of contiguous regions is read from the source in one
//     request and written to the destination; an all-zero region within it
//     becomes a destination Discard instead of a write.
//
// Copies are bounded by an adaptive window of bytes in flight (pacer.go),
// by the region cap (HydrationThreshold) and by the rate limit (a
// golang.org/x/time/rate Limiter the dispatcher waits on before it claims a
// batch, so a wait never holds regions a user write might need). The batch
// size follows the window (a quarter of it, one region to BatchSize
// regions), so that on a slow link a user read waits behind small copies,
// not 1 MiB ones. A failed copy releases its regions and makes the
// dispatcher back off (RetryMin doubling to RetryMax) before it starts
// anything else: a dead source costs one attempt per backoff period, never
// a busy loop, and the error is reported through Status and the progress
// callback.

const maxHints = 256

// maxSkip bounds the bytes one skip job hydrates (one destination call).
const maxSkip = 256 << 20

// maxSkipJobs bounds the skip jobs in flight.
const maxSkipJobs = 4

// earlyCommit is how many bytes background copies hydrate before they ask
// for a commit ahead of the commit interval. A commit flushes the
// destination; flushing as hydration goes, while the source is the
// bottleneck, leaves the final Flush little to write.
const earlyCommit = 16 << 20

// batch is a claimed run of regions [r0, r0+n).
type batch struct {
	r0, n uint64
	f     *flight
	st    stamp               // the pacer's, at issue (copies)
	skip  bool                // hydrate as metadata: the source range is a hole or zeros
	state blockdev.Allocation // for skip: Hole or Zero
	bytes int64               // the run's bytes
}

type hydrator struct {
	c    *Clone
	wake chan struct{} // capacity 1: something changed, look again
	lim  *rate.Limiter // background copy bytes; safe for concurrent use
	smap *srcMap       // nil when the source cannot map its allocation

	copied, skipped atomic.Int64 // bytes copied from the source; hydrated without a copy
	lastUser        atomic.Int64 // when a user read of the source last ended (ns since start)
	epoch           time.Time    // base of lastUser

	// mu guards the fields below; taken before Clone.io.mu and srcMap.mu.
	mu            sync.Mutex
	paused        bool
	threshold     int // regions in flight at most
	payCancel     context.CancelFunc
	pace          pacer
	inflight      int       // regions claimed by background copies
	inflightBytes int64     // bytes of those copies
	idleSince     time.Time // when inflightBytes last dropped to 0
	skipping      int       // skip jobs in flight
	sinceCommit   int64     // bytes copied since the last early commit request
	earlyCommit   int64     // earlyCommit, or the test's value
	cursor        uint64
	low           uint64 // no region below it is unhydrated: the source map is dropped below it
	hints         []uint64
	failures      int           // consecutive failed copies
	backoff       time.Duration // wait owed before the next copy
	lastErr       error
	errs          int64
	closed        bool
	rateMark      time.Time // start of the current rate measurement
	rateBytes     int64     // hydrated bytes at rateMark
	reported      time.Time
	lastState     State
}

func newHydrator(c *Clone) *hydrator {
	h := &hydrator{c: c, wake: make(chan struct{}, 1), paused: c.opts.NoHydration, epoch: time.Now()}
	h.threshold = c.opts.HydrationThreshold
	if h.threshold <= 0 {
		h.threshold = int(max(int64(c.batch), DefaultMaxInFlight/c.geo.RegionSize))
	}
	batchBytes := int64(c.batch) * c.geo.RegionSize
	h.pace = newPacer(c.geo.RegionSize, int64(h.threshold)*c.geo.RegionSize, max(4*batchBytes, initialWindow), h.epoch)
	h.idleSince = h.epoch
	h.earlyCommit = earlyCommit
	if c.opts.testEarlyCommit > 0 {
		h.earlyCommit = c.opts.testEarlyCommit
	}
	h.lim = rate.NewLimiter(limitOf(c.opts.RateLimit), c.bufSize)
	h.smap = newSrcMap(c.src, h.kick)
	h.rateMark = h.epoch
	h.rateBytes = h.hydratedBytes()
	h.lastState = -1
	h.lastUser.Store(-int64(time.Hour))
	return h
}

// limitOf is the rate.Limit of a RateLimit in bytes per second.
func limitOf(bytesPerSecond int64) rate.Limit {
	if bytesPerSecond <= 0 {
		return rate.Inf
	}
	return rate.Limit(bytesPerSecond)
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

// userDone notes that a user read of the source ended: background copies
// yield for a while.
func (h *hydrator) userDone() { h.lastUser.Store(int64(time.Since(h.epoch))) }

// yielding reports whether user I/O is reading the source or did lately.
func (h *hydrator) yielding() bool {
	return h.c.userSrc.Load() > 0 || time.Since(h.epoch)-time.Duration(h.lastUser.Load()) < yieldFor
}

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
// is hydrated, after waiting for its jobs (and the mapper).
func (h *hydrator) run() {
	ctx := h.c.ctx
	var g errgroup.Group
	defer g.Wait()
	if h.smap != nil {
		mctx, stop := context.WithCancel(ctx)
		defer stop() // before g.Wait: the mapper may wait for a scan that ended
		g.Go(func() error { h.smap.run(mctx); return nil })
	}
	// Jobs go to idle workers; a new worker starts only when none is
	// idle, so the workers number the most jobs ever in flight at once,
	// and a job costs no goroutine or closure.
	jobs := make(chan batch)
	defer close(jobs) // before g.Wait: idle workers return
	var paid int64    // rate tokens obtained and not yet spent
	for {
		h.report()
		if ctx.Err() != nil {
			return
		}
		if h.c.md.allHydrated() {
			return
		}
		b, need, wait := h.next(paid)
		switch {
		case b.f != nil:
			if !b.skip {
				paid = max(0, paid-b.bytes)
			}
			select {
			case jobs <- b:
			default:
				g.Go(func() error { h.worker(ctx, b, jobs); return nil })
			}
			continue
		case need > 0:
			if n, err := h.pay(ctx, need); err == nil {
				paid += n
			}
			continue // closed, or the rate changed: look again
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

// pay waits until the rate limit allows n more bytes (at most the burst)
// and returns what it paid. It returns early with an error when ctx ends or
// SetRateLimit changes the rate (the caller looks again, paying at the new
// rate).
func (h *hydrator) pay(ctx context.Context, n int64) (int64, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	h.mu.Lock()
	h.payCancel = cancel
	h.mu.Unlock()
	// Never above the burst: WaitN refuses that at once, which would make
	// the dispatcher spin.
	n = min(n, int64(h.lim.Burst()))
	err := h.lim.WaitN(wctx, int(n))
	h.mu.Lock()
	h.payCancel = nil
	h.mu.Unlock()
	return n, err
}

// next claims the next job, or says how many rate-limit bytes must be paid
// first (need), or how long to wait (0: until woken). paid is what the
// dispatcher holds already.
func (h *hydrator) next(paid int64) (b batch, need int64, wait time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.paused {
		return batch{}, 0, 0
	}
	if h.backoff > 0 {
		d := h.backoff
		h.backoff = 0
		return batch{}, 0, d
	}
	if h.inflight >= h.threshold {
		return batch{}, 0, 0
	}
	yield := h.yielding()
	win := h.pace.window(yield)
	room := uint64(min(h.threshold-h.inflight, h.batchRegions(win, yield)))
	if h.inflightBytes >= win {
		// The window is full: only skips, which read nothing.
		if b, ok := h.pick(0, noLimit, true, true); ok {
			return h.started(b), 0, 0
		}
		return batch{}, 0, 0
	}
	want := min(int64(room)*h.c.geo.RegionSize, int64(h.c.bufSize))
	if h.lim.Limit() != rate.Inf && paid < want {
		// Pay for a whole batch before claiming one: skips cost
		// nothing, and a short batch leaves the rest paid for the next.
		if b, ok := h.pick(room, noLimit, true, true); ok {
			return h.started(b), 0, 0
		}
		return batch{}, want, 0
	}
	if b, ok := h.pick(room, noLimit, false, true); ok {
		return h.started(b), 0, 0
	}
	// Nothing to claim now. The wait ends when a job finishes, the
	// mapper advances or a hint arrives; while yielding, poll so that the
	// window grows back when user reads stop.
	if h.yielding() {
		return batch{}, 0, yieldFor
	}
	return batch{}, 0, 0
}

// noLimit: a skip may be as long as its extent (up to maxSkip).
const noLimit = ^uint64(0)

// batchRegions is the batch size for a window of win bytes: a quarter of
// it, from one region to BatchSize regions; BatchSize until the source has
// been measured (one region while yielding). Called with mu held.
func (h *hydrator) batchRegions(win int64, yield bool) int {
	rs := h.c.geo.RegionSize
	switch {
	case h.pace.rate() == 0 && yield:
		return 1
	case h.pace.rate() == 0:
		return h.c.batch
	case yield:
		return int(min(h.pace.yieldBatch(win)/rs, int64(h.c.batch)))
	}
	return int(min(max(win/4/rs, 1), int64(h.c.batch)))
}

// started counts a claimed job in flight. Called with mu held.
func (h *hydrator) started(b batch) batch {
	if b.skip {
		h.skipping++
		return b
	}
	now := time.Now()
	if h.inflightBytes == 0 && now.Sub(h.idleSince) > h.pace.latency() {
		// After an idle spell longer than a round trip the rate
		// measurement starts over.
		h.pace.restart(now)
	}
	b.st = h.pace.issue(now)
	h.inflight += int(b.n)
	h.inflightBytes += b.bytes
	return b
}

// pick claims a job: at a hinted region if there is one, else from the
// cursor on; a copy of at most room regions, a skip of at most skipRoom.
// skipsOnly: only a skip may be claimed (the window is full or the rate
// limit is not paid). mapWait: if the map has not reached the scan yet,
// claim nothing (the mapper wakes the dispatcher); tests stepping by hand
// copy instead. Called with mu held.
func (h *hydrator) pick(room, skipRoom uint64, skipsOnly, mapWait bool) (batch, bool) {
	c := h.c
	c.io.Lock()
	defer c.io.Unlock()
	for len(h.hints) > 0 && !skipsOnly {
		r := h.hints[0]
		h.hints = h.hints[1:]
		if b, ok, _ := h.claimAt(r, room, skipRoom, false); ok {
			return b, true
		}
	}
	for pass, from := range []uint64{h.cursor, 0} {
	scan:
		for r, ok := c.md.nextUnhydrated(from); ok; r, ok = c.md.nextUnhydrated(r + 1) {
			if c.io.flights[r] != nil {
				continue
			}
			if h.smap != nil && mapWait {
				if _, known := h.smap.lookup(c.regionStart(r)); !known {
					if pass == 0 {
						break scan // what lies before the cursor may be known
					}
					return batch{}, false
				}
			}
			b, ok, resume := h.claimAt(r, room, skipRoom, skipsOnly)
			if !ok {
				if skipsOnly && resume <= r {
					return batch{}, false // data next: it must wait
				}
				r = max(r, resume-1)
				continue
			}
			h.cursor = b.r0 + b.n
			if h.cursor >= c.geo.Regions {
				h.cursor = 0
			}
			if h.smap != nil {
				// Below the first unhydrated region the map is never
				// needed again (hydrated regions stay hydrated).
				if low, ok := c.md.nextUnhydrated(h.low); ok {
					h.low = low
					h.smap.advance(c.regionStart(low))
				}
			}
			return b, true
		}
	}
	return batch{}, false
}

// claimAt claims a job at free region r: a skip if the source map puts r
// wholly in a hole or zero extent, else a copy. When it claims nothing,
// resume is where the scan may go on (past a hole it could not start a
// skip for). Called with c.io held.
func (h *hydrator) claimAt(r, room, skipRoom uint64, skipsOnly bool) (b batch, ok bool, resume uint64) {
	c := h.c
	if !h.free(r) {
		return batch{}, false, r + 1
	}
	limit := room
	if h.smap != nil {
		e, known := h.smap.lookup(c.regionStart(r))
		switch {
		case known && e.state != blockdev.Allocated && e.end >= c.regionEnd(r):
			// Whole regions inside the extent (the last one of the
			// source may be short).
			lo := c.regionStart(r)
			n := uint64((min(e.end, lo+maxSkip) - lo) >> c.shift)
			if e.end >= c.size && c.size-lo <= maxSkip {
				n = c.geo.Regions - r
			}
			if h.skipping >= maxSkipJobs || skipRoom == 0 {
				return batch{}, false, r + max(1, n)
			}
			b := h.claimRun(r, min(max(1, n), skipRoom), false)
			b.skip, b.state = true, e.state
			return b, true, 0
		case known && e.state != blockdev.Allocated:
			// The region ends in data: copy through that data extent.
			e, known = h.smap.lookup(e.end)
			fallthrough
		case known:
			// Stop at the data's end: what follows may be a hole.
			end := uint64(1)
			if known && e.state == blockdev.Allocated {
				end = uint64((e.end+c.geo.RegionSize-1)>>c.shift) - r
			}
			limit = min(limit, max(1, end))
		}
	}
	if skipsOnly || limit == 0 {
		return batch{}, false, r
	}
	return h.claimRun(r, limit, true), true, 0
}

func (h *hydrator) free(r uint64) bool {
	c := h.c
	return r < c.geo.Regions && c.io.flights[r] == nil && !c.md.test(r)
}

// claimRun claims the run of free regions starting at free region r, at
// most room long, for a copy (user claims may rob it) or a skip (it does no
// source I/O: they wait for it). Called with c.io held.
func (h *hydrator) claimRun(r, room uint64, robbable bool) batch {
	c := h.c
	b := batch{r0: r, f: c.newFlight(robbable)}
	for b.n < room && h.free(r+b.n) {
		c.io.flights[r+b.n] = b.f
		b.n++
	}
	b.bytes = c.regionEnd(b.r0+b.n-1) - c.regionStart(b.r0)
	return b
}

// worker runs job b, then the jobs it receives until jobs is closed.
func (h *hydrator) worker(ctx context.Context, b batch, jobs <-chan batch) {
	for ok := true; ok; b, ok = <-jobs {
		h.runJob(ctx, b)
	}
}

// runJob runs a claimed job and releases it.
func (h *hydrator) runJob(ctx context.Context, b batch) {
	c := h.c
	err := c.doJob(ctx, b)
	c.release(b.f, b.r0, b.r0+b.n-1, err == nil)
	// Wake the dispatcher after the counts drop (release's wake-up may
	// have been consumed while the job was still counted).
	defer h.kick()
	h.mu.Lock()
	defer h.mu.Unlock()
	if b.skip {
		h.skipping--
	} else {
		now := time.Now()
		h.inflight -= int(b.n)
		h.inflightBytes -= b.bytes
		if h.inflightBytes == 0 {
			h.idleSince = now
		}
		if err == nil {
			h.pace.sample(now, b.st, b.bytes)
			h.sinceCommit += b.bytes
			if h.sinceCommit >= h.earlyCommit {
				h.sinceCommit = 0
				select {
				case c.md.early <- struct{}{}:
				default:
				}
			}
		}
	}
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

// doJob hydrates a claimed job's regions: a skip as metadata, a copy
// through a pooled buffer.
func (c *Clone) doJob(ctx context.Context, b batch) error {
	lo, hi := c.regionStart(b.r0), c.regionEnd(b.r0+b.n-1)
	if b.skip {
		return c.skipRange(lo, hi, b.state)
	}
	bp := c.getBuf()
	defer c.putBuf(bp)
	return c.copyRange(ctx, *bp, b.f, lo, hi)
}

// skipRange hydrates [lo, hi), which reads as zeros in the source, without
// reading it: a hole stays a hole (a Discard; a file gets its range
// punched), a zero extent is zeroed (WriteZeroes: it stays allocated, as in
// the source). With NoDiscardPassdown both are zeroed.
func (c *Clone) skipRange(lo, hi int64, state blockdev.Allocation) error {
	var err error
	if state == blockdev.Hole && !c.opts.NoDiscardPassdown {
		err = discardOrZero(c.dst, lo, hi-lo)
	} else {
		err = blockdev.WriteZeroes(c.dst, lo, hi-lo)
	}
	if err != nil {
		return hydrateErr("zero destination", lo, hi-lo, err)
	}
	c.hyd.addSkipped(hi - lo)
	return nil
}

// copyRange copies [lo, hi), claimed by background copy f, from the
// source to the destination through buf, in chunks of len(buf). Within a
// chunk, runs of all-zero regions are discarded on the destination, runs
// of data regions written with one call each, and regions robbed by user
// claims meanwhile left to them.
func (c *Clone) copyRange(ctx context.Context, buf []byte, f *flight, lo, hi int64) error {
	for off := lo; off < hi; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf)), hi-off)
		chunk := buf[:n]
		if _, err := c.src.ReadAt(chunk, off); err != nil {
			return hydrateErr("read source", off, n, err)
		}
		r0, r1 := c.regionsOf(off, n)
		robbed, anyRobbed := c.seal(f, r0, r1+1)
		unit := min(c.geo.RegionSize, n)
		// kind of the region at chunk offset i: 0 data, 1 zeros, 2
		// robbed (left alone).
		kind := func(i int64) int {
			switch {
			case anyRobbed && robbed.has(uint64(i>>c.shift)):
				return 2
			case blockdev.IsZero(chunk[i:min(i+unit, n)]):
				return 1
			}
			return 0
		}
		for i := int64(0); i < n; {
			k := kind(i)
			j := min(i+unit, n)
			for j < n && kind(j) == k {
				j = min(j+unit, n)
			}
			if err := c.putRun(chunk[i:j], off+i, k); err != nil {
				return err
			}
			i = j
		}
		off += n
	}
	return nil
}

// putRun writes a run of a copied chunk to the destination: data (kind
// 0), zeros (1, discarded) or robbed regions (2, nothing).
func (c *Clone) putRun(p []byte, off int64, kind int) error {
	n := int64(len(p))
	switch kind {
	case 1:
		if err := discardOrZero(c.dst, off, n); err != nil {
			return hydrateErr("discard destination", off, n, err)
		}
		c.hyd.addSkipped(n)
	case 0:
		if _, err := c.dst.WriteAt(p, off); err != nil {
			return hydrateErr("write destination", off, n, err)
		}
		c.hyd.addCopied(n)
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

// SetThreshold sets the cap on the regions background hydration keeps in
// flight (at least 1); within it the window adapts to the source.
func (c *Clone) SetThreshold(regions int) {
	h := c.hyd
	h.mu.Lock()
	h.threshold = max(1, regions)
	h.pace.maxWin = max(h.pace.minWin, int64(h.threshold)*c.geo.RegionSize)
	h.mu.Unlock()
	h.kick()
}

// SetRateLimit caps background hydration at bytesPerSecond (0: no cap).
// It takes effect at once, also while the dispatcher waits for the old
// rate.
func (c *Clone) SetRateLimit(bytesPerSecond int64) {
	h := c.hyd
	h.mu.Lock()
	h.lim.SetLimit(limitOf(bytesPerSecond))
	if h.payCancel != nil {
		h.payCancel()
	}
	h.mu.Unlock()
	h.kick()
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

// step claims one job of at most n regions and runs it synchronously,
// whatever the dispatcher is doing: hydration driven one step at a time
// (tests use it to interleave hydration with I/O deterministically). It
// returns the number of regions hydrated.
func (h *hydrator) step(ctx context.Context, n uint64) (uint64, error) {
	c := h.c
	h.mu.Lock()
	b, ok := h.pick(max(1, n), max(1, n), false, false)
	h.mu.Unlock()
	if !ok {
		return 0, nil
	}
	err := c.doJob(ctx, b)
	c.release(b.f, b.r0, b.r0+b.n-1, err == nil)
	if err != nil {
		return 0, err
	}
	return b.n, nil
}
