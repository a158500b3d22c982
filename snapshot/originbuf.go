package snapshot

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/lockstat"
)

// The origin write buffer.
//
// An origin write that needs a copy-on-write is acknowledged once the copy
// is in the store and its index record appended: the new data waits in
// memory, one whole chunk per entry, until a commit makes the copy and the
// record durable (docs/design.md, "The shared snapshot store"; and its crash
// model: an acknowledged write not covered by a Flush may be lost). drainOrigin commits the journal (store flush,
// then records) and only then writes each entry the commit covered to the
// origin device and drops it, so the origin never receives new data for a
// chunk before that chunk's copy and record are durable.
//
// An entry is found through the origin stripe of its chunk and guarded by
// it: reads of the origin take the stripes shared and see buffered data; a
// later write to a buffered chunk (copy needed or not) updates the entry;
// the drain writes an entry out and drops it under the stripe held
// exclusively. Entries are created only by a copy-on-write, and every
// snapshot of the origin drains the buffer first (quiesce), so a buffered
// chunk always has a store copy for every snapshot and snapshot reads never
// resolve to a buffered chunk's origin data.
//
// Drains run on the background committer (every CommitInterval, and when
// the buffer is half full), on Flush, snapshot and clone creation of the
// origin, Close, and in a writer that finds the buffer full (backpressure:
// the bound is soft, each writer past the check adds at most maxSegChunks).
// A failed commit fails the store (the data stays buffered and never reaches
// the origin); a failed origin write keeps the entry buffered for the next
// drain and is reported once by the next Flush.

// defaultOriginBuffer is the default bound on buffered origin data.
const defaultOriginBuffer = 32 << 20

type obEntry struct {
	c uint64
	// seq is the record that preserved the chunk: the entry may reach the
	// origin once it is durable.
	seq uint64
	// discard: the whole chunk was discarded since the last data write, so
	// the drain discards rather than writes (data is all zeros then).
	discard bool
	data    []byte   // the chunk's contents: chunkLen bytes are used
	dirty   []uint64 // bitmap of the blocks (of the volume block size) written
}

type originBuf struct {
	max int64        // bound on entries; 0: buffering off
	n   atomic.Int64 // entries buffered
	// byStripe[i] maps the buffered chunks of origin stripe i; guarded by
	// that stripe.
	byStripe [nStripes]map[uint64]*obEntry

	mu    sync.Mutex // guards queue, spare, free, err, drained, got and idle
	queue []*obEntry // buffered entries: those a drain kept (in chunk order), then newer ones
	spare []*obEntry // the drain's second queue, reused
	free  []*obEntry
	// got counts the entries taken (obGet); idle counts the committer's
	// ticks since the last tick at which got had moved or the buffer
	// held entries (obIdleTick).
	got  uint64
	idle struct {
		ticks int
		got   uint64
		drops int // times the free entries were dropped
	}
	err error // first write-out failure not yet reported by Flush

	drainMu sync.Mutex // serialises drains; guards wbuf
	wbuf    []byte     // the drain's buffer for writes of several chunks
	kick    chan struct{}
	// room, on mu, is broadcast when a drain has written out a run of
	// chunks (made room) and when a hold of drainMu ends (drained counts
	// those): a writer that finds the buffer full while another drains
	// waits for room, not for the whole drain (obWait).
	room    *sync.Cond
	drained uint64
	waiting int // writers waiting on room

	// waitMax and waits: the longest a writer spent in obWait with the
	// buffer full (draining it, or waiting for a drain), and how many
	// did (LockStats).
	waitMax lockstat.Max
	waits   atomic.Uint64
}

func (s *Store) initOriginBuf() {
	s.ob.room = sync.NewCond(&s.ob.mu)
	if s.opts.Transient || s.opts.OriginBuffer < 0 {
		return // nothing to wait for, or buffering off
	}
	b := s.opts.OriginBuffer
	if b == 0 {
		b = defaultOriginBuffer
	}
	s.ob.max = max(1, b/s.cs)
	s.ob.kick = make(chan struct{}, 1)
}

// bufferedLocked returns the buffered entry of chunk c, or nil. Called
// with c's origin stripe held (either mode).
func (s *Store) bufferedLocked(c uint64) *obEntry {
	if s.ob.n.Load() == 0 {
		return nil
	}
	return s.ob.byStripe[c%nStripes][c] // a nil map reads as empty
}

// anyBufferedLocked reports whether a chunk of [c0, c1] is buffered.
func (s *Store) anyBufferedLocked(c0, c1 uint64) bool {
	if s.ob.n.Load() == 0 {
		return false
	}
	for c := c0; c <= c1; c++ {
		if s.ob.byStripe[c%nStripes][c] != nil {
			return true
		}
	}
	return false
}

// obSlab is the memory allocated at once for entries: up to 1 MiB of chunk
// buffers (one aligned allocation, so small chunks do not each pay the
// alignment slack) and the entries themselves.
const obSlab = 1 << 20

// obGet returns an unused entry for chunk c, reusing freed ones; entries
// are allocated a slab at a time, and only until the buffer's bound is
// reached (they are reused from then on).
func (s *Store) obGet(c uint64) *obEntry {
	s.ob.mu.Lock()
	if len(s.ob.free) == 0 {
		s.obGrowLocked()
	}
	k := len(s.ob.free)
	e := s.ob.free[k-1]
	s.ob.free = s.ob.free[:k-1]
	s.ob.got++
	s.ob.mu.Unlock()
	e.c, e.seq, e.discard = c, 0, false
	clear(e.dirty)
	return e
}

func (s *Store) obGrowLocked() {
	n := max(1, min(obSlab/s.cs, s.ob.max))
	words := (s.cs/int64(s.bs) + 63) / 64
	data := blockdev.AlignedBuffer(int(n * s.cs))
	dirty := make([]uint64, n*words)
	es := make([]obEntry, n)
	for i := range es {
		es[i].data = data[int64(i)*s.cs : int64(i+1)*s.cs : int64(i+1)*s.cs]
		es[i].dirty = dirty[int64(i)*words : int64(i+1)*words : int64(i+1)*words]
		s.ob.free = append(s.ob.free, &es[i])
	}
}

// obIdleTicks is how many of the committer's ticks (CommitInterval each)
// the buffer must stay empty, with no copy-on-write taking an entry,
// before it gives its memory back.
const obIdleTicks = 5

// obIdleTick is the committer's tick for the buffer: once the origin has
// taken no entry for obIdleTicks ticks and nothing is buffered, the free
// entries are dropped, and with them the slabs (up to OriginBuffer bytes
// and a slab) that no entry in use still holds. A store whose origin went
// quiet does not keep that memory for good; the next copy-on-write
// allocates a slab again. It reports whether it dropped them.
func (s *Store) obIdleTick() bool {
	s.ob.mu.Lock()
	defer s.ob.mu.Unlock()
	if s.ob.got != s.ob.idle.got || s.ob.n.Load() > 0 {
		s.ob.idle.ticks, s.ob.idle.got = 0, s.ob.got
		return false
	}
	s.ob.idle.ticks++
	if s.ob.idle.ticks < obIdleTicks || s.ob.free == nil {
		return false
	}
	s.ob.free = nil
	s.ob.idle.drops++
	return true
}

// obPut returns an entry that is not (or no longer) buffered.
func (s *Store) obPut(e *obEntry) {
	s.ob.mu.Lock()
	if int64(len(s.ob.free)) < s.ob.max+obSlab/s.cs+maxSegChunks {
		s.ob.free = append(s.ob.free, e)
	}
	s.ob.mu.Unlock()
}

// obInsertLocked buffers e, whose copy record is seq. Called with e's
// origin stripe held exclusively.
func (s *Store) obInsertLocked(e *obEntry, seq uint64) {
	e.seq = seq
	m := &s.ob.byStripe[e.c%nStripes]
	if *m == nil {
		*m = map[uint64]*obEntry{}
	}
	(*m)[e.c] = e
	s.ob.mu.Lock()
	s.ob.queue = append(s.ob.queue, e)
	s.ob.mu.Unlock()
	if s.ob.n.Add(1) >= (s.ob.max+1)/2 {
		s.obKick()
	}
}

// obKick asks the background committer for a drain.
func (s *Store) obKick() {
	if s.ob.n.Load() == 0 || s.opts.CommitInterval < 0 {
		return
	}
	select {
	case s.ob.kick <- struct{}{}:
	default:
	}
}

// obMergeLocked applies a write (or, p nil, a discard) of k bytes at offset
// in of e's chunk (whole blocks). Called with the chunk's origin stripe held
// exclusively. Only the blocks written are marked for the write-out: the
// others are not rewritten, so a power cut can tear only what was written.
func (s *Store) obMergeLocked(e *obEntry, p []byte, in, k int64) {
	bs := int64(s.bs)
	for b := in / bs; b < (in+k+bs-1)/bs; b++ {
		e.dirty[b/64] |= 1 << (b % 64)
	}
	if p == nil {
		clear(e.data[in : in+k])
		if in == 0 && k == s.chunkLen(e.c) {
			e.discard = true
		}
		return
	}
	copy(e.data[in:in+k], p)
	e.discard = false
}

// obWait is the backpressure: a writer about to buffer more finds the
// buffer full and drains it first. Called with no origin stripe held.
func (s *Store) obWait() error {
	if s.ob.n.Load() < s.ob.max {
		return nil
	}
	t0 := time.Now()
	defer func() {
		s.ob.waits.Add(1)
		s.ob.waitMax.Note(int64(time.Since(t0)))
	}()
	for s.ob.n.Load() >= s.ob.max {
		s.ob.mu.Lock()
		gen := s.ob.drained
		s.ob.mu.Unlock()
		if s.ob.drainMu.TryLock() {
			var err error
			if s.ob.n.Load() >= s.ob.max { // else another drain made room
				err = s.drainLocked(s.ctx, false)
			}
			s.obDrainUnlock()
			return err
		}
		// A drain is under way (the committer's, usually): wait until it
		// has written out a run, or has ended, rather than for all of its
		// write-outs (up to the whole buffer, milliseconds).
		s.ob.mu.Lock()
		s.ob.waiting++
		for s.ob.drained == gen && s.ob.n.Load() >= s.ob.max {
			s.ob.room.Wait()
		}
		s.ob.waiting--
		s.ob.mu.Unlock()
	}
	return nil
}

// obDrainUnlock ends a hold of drainMu: it releases it, then wakes the
// writers waiting in obWait (which see drained change, and drain
// themselves if the buffer is still full). In that order: a writer woken
// first could find drainMu still held and wait for a drain that is over.
func (s *Store) obDrainUnlock() {
	s.ob.drainMu.Unlock()
	s.ob.mu.Lock()
	s.ob.drained++
	s.ob.room.Broadcast()
	s.ob.mu.Unlock()
}

// drainOrigin commits the journal, then writes every buffered chunk whose
// copy record the commit covered to the origin device and drops it. It
// does not flush the origin. With yield (the committer's drain, which no
// writer waits for step by step) it yields the processor where it has
// released what writers wait for; a writer draining a full buffer itself
// (obWait), or a Flush, does not.
func (s *Store) drainOrigin(ctx context.Context, yield bool) error {
	if s.ob.max == 0 {
		return nil
	}
	s.ob.drainMu.Lock()
	defer s.obDrainUnlock()
	return s.drainLocked(ctx, yield)
}

// maybeYield yields the processor if yield is set: a background goroutine
// that just released a lock or slot a writer waits for, which Go runs next
// on this processor but only once this goroutine blocks or has run out
// its time slice (package pace says why).
func maybeYield(yield bool) {
	if yield {
		runtime.Gosched()
	}
}

func (s *Store) drainLocked(ctx context.Context, yield bool) error {
	if s.ob.n.Load() == 0 {
		return nil
	}
	if p := s.failed.Load(); p != nil {
		return fmt.Errorf("snapshot: store failed earlier; buffered origin writes cannot be written out: %w", *p)
	}
	target := s.j.LastSeq()
	// One identity write for the whole drain, made beside the commit
	// rather than after it: its two slot writes and flushes were a third
	// of the device flushes a first-write pass waited for, one after the
	// other with the commit's. Both must be durable before any write-out,
	// in either order. The queue's entries up to now stay in place until
	// this drain takes them (writers only append), so the marking reads
	// them unlocked. Its failure is not the drain's: no entry is written
	// out unmarked, as each write-out's touchSamples marks again and
	// reports its own failure.
	s.ob.mu.Lock()
	pre := s.ob.queue
	s.ob.mu.Unlock()
	maybeYield(yield) // a writer blocked on ob.mu runs before the commit's writes
	var marking sync.WaitGroup
	if s.unmarkedOf(pre) != 0 {
		marking.Go(func() { _ = s.markQueued(pre) })
	}
	err := s.commit(ctx)
	marking.Wait()
	if err != nil {
		return err
	}
	s.ob.mu.Lock()
	q := s.ob.queue
	s.ob.queue = s.ob.spare[:0]
	s.ob.mu.Unlock()
	maybeYield(yield) // the writers the commit and ob.mu woke run before the marking and sort
	// The entries queued during the commit (nothing to write when they
	// touch no new sample).
	_ = s.markQueued(q[len(pre):])
	// In chunk order, so that buffered chunks next to each other are
	// written out together (obDrainRun). The queue's order matters to
	// nothing else: an entry may reach the origin once its own record is
	// durable, whatever the others'.
	slices.SortFunc(q, func(a, b *obEntry) int { return cmp.Compare(a.c, b.c) })
	var first error
	kept := q[:0] // entries not written out
	for i := 0; i < len(q); {
		j := i + 1
		for j < len(q) && j-i < obRunMax && q[j].c == q[j-1].c+1 {
			j++
		}
		var err error
		// kept never passes j: each entry of q[:j] is kept at most once.
		kept, err = s.obDrainRun(q[i:j], target, kept)
		if err != nil && first == nil {
			first = err
		}
		i = j
		maybeYield(yield) // the run's stripes and buffer slots are released
	}
	s.ob.mu.Lock()
	// Entries buffered meanwhile follow the kept ones.
	kept = append(kept, s.ob.queue...)
	s.ob.spare = s.ob.queue[:0]
	s.ob.queue = kept
	if first != nil && s.ob.err == nil {
		s.ob.err = first
	}
	s.ob.mu.Unlock()
	return first
}

// obRunMax is the most buffered chunks of consecutive numbers a drain
// takes together: their stripes are locked at once (fewer than nStripes,
// so each once, in ascending order) and whole ones written with one
// device write (obWriteWhole), at most obRunBytes at a time.
const (
	obRunMax   = 64
	obRunBytes = 256 << 10
)

// obDrainRun writes out the entries of run, buffered chunks of consecutive
// numbers in ascending order, whose copy record is covered by target, and
// drops them; it appends the others (not yet covered, or whose write-out
// failed) to kept, after it is done with run (kept may share run's array
// up to run's end). It takes the run's stripes exclusively. Each stretch
// of adjacent whole chunks (every block written, not discarded) is one
// device write rather than one per chunk: a random first write after a
// snapshot leaves a quarter or more of the buffered chunks next to another
// one, and the drain's write-outs are what every writer waiting for
// buffer room waits for. Entries written only in part keep their own
// write-out (obWriteOut), which rewrites only the blocks written.
func (s *Store) obDrainRun(run []*obEntry, target uint64, kept []*obEntry) ([]*obEntry, error) {
	c0, c1 := run[0].c, run[len(run)-1].c
	s.lockOrigin(c0, c1, true)
	var first error
	var out uint64 // bit i: run[i] was written out
	for a := 0; a < len(run); {
		if run[a].seq > target { // appended after the commit's target was taken
			a++
			continue
		}
		b := a + 1
		if s.obWhole(run[a]) {
			for b < len(run) && run[b].seq <= target && s.obWhole(run[b]) && int64(b-a+1)*s.cs <= obRunBytes {
				b++
			}
		}
		var err error
		if b-a == 1 {
			err = s.obWriteOut(run[a])
		} else {
			err = s.obWriteWhole(run[a:b])
		}
		if err != nil {
			if first == nil {
				first = err
			}
		} else {
			out |= (1<<(b-a) - 1) << a
		}
		a = b
	}
	for i, e := range run {
		if out&(1<<i) != 0 {
			delete(s.ob.byStripe[e.c%nStripes], e.c)
			s.ob.n.Add(-1)
		}
	}
	s.unlockOrigin(c0, c1, true)
	for i, e := range run {
		if out&(1<<i) != 0 {
			s.obPut(e)
		} else {
			kept = append(kept, e)
		}
	}
	if out != 0 { // room made: a writer waiting in obWait may go on
		s.ob.mu.Lock()
		s.ob.room.Broadcast()
		s.ob.mu.Unlock()
	}
	return kept, first
}

// obWhole reports whether e's every block was written (and not
// discarded since), so that writing all of it rewrites nothing unwritten.
// Called with e's stripe held.
func (s *Store) obWhole(e *obEntry) bool {
	if e.discard {
		return false
	}
	nb := (s.chunkLen(e.c) + int64(s.bs) - 1) / int64(s.bs)
	for w := int64(0); w < nb/64; w++ {
		if e.dirty[w] != ^uint64(0) {
			return false
		}
	}
	if r := nb % 64; r != 0 && e.dirty[nb/64]&(1<<r-1) != 1<<r-1 {
		return false
	}
	return true
}

// obWriteWhole writes the whole entries es, chunks of consecutive numbers,
// to the origin device with one write through the drain's buffer. Called
// with drainMu and their stripes held.
func (s *Store) obWriteWhole(es []*obEntry) error {
	c0, last := es[0].c, es[len(es)-1].c
	off := int64(c0) * s.cs
	n := int64(last-c0)*s.cs + s.chunkLen(last)
	if s.ob.wbuf == nil {
		s.ob.wbuf = blockdev.AlignedBuffer(int(max(s.cs, obRunBytes)))
	}
	if err := s.touchSamples(off, n); err != nil {
		return fmt.Errorf("snapshot: write-out of buffered origin chunks %d-%d: %w", c0, last, err)
	}
	for i, e := range es {
		copy(s.ob.wbuf[int64(i)*s.cs:], e.data[:s.chunkLen(e.c)])
	}
	if _, err := s.origin.WriteAt(s.ob.wbuf[:n], off); err != nil {
		return fmt.Errorf("snapshot: write-out of buffered origin chunks %d-%d: %w", c0, last, err)
	}
	return nil
}

// writeOutDurable is Close's drain for a failed store: no commit is
// possible, but every buffered chunk whose copy record is already durable
// may still reach the origin, which is then flushed. It reports the chunks
// it had to drop, and write-out failures.
func (s *Store) writeOutDurable() error {
	if s.ob.max == 0 || s.ob.n.Load() == 0 {
		return nil
	}
	s.ob.drainMu.Lock()
	defer s.obDrainUnlock()
	durable := s.durableSeq.Load()
	s.ob.mu.Lock()
	q := s.ob.queue
	s.ob.queue = nil
	s.ob.mu.Unlock()
	var lost []uint64
	var errs []error
	for _, e := range q {
		st := &s.originLocks[e.c%nStripes]
		st.Lock()
		if e.seq > durable {
			lost = append(lost, e.c)
		} else if err := s.obWriteOut(e); err != nil {
			errs = append(errs, err)
			lost = append(lost, e.c)
		}
		delete(s.ob.byStripe[e.c%nStripes], e.c)
		s.ob.n.Add(-1)
		st.Unlock()
	}
	if err := s.origin.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("snapshot: flush origin: %w", err))
	}
	if len(lost) > 0 {
		slices.Sort(lost)
		shown := lost[:min(len(lost), 32)]
		errs = append(errs, fmt.Errorf("snapshot: %d acknowledged origin writes lost (their copy-on-write is not durable; the origin keeps the old data): chunks %v of %d bytes%s",
			len(lost), shown, s.cs, map[bool]string{true: " ..."}[len(lost) > len(shown)]))
	}
	return errors.Join(errs...)
}

// obWriteOut writes one entry's written blocks to the origin device, one
// call per run.
func (s *Store) obWriteOut(e *obEntry) error {
	off, cl := int64(e.c)*s.cs, s.chunkLen(e.c)
	if err := s.touchSamples(off, cl); err != nil {
		return fmt.Errorf("snapshot: write-out of buffered origin chunk %d: %w", e.c, err)
	}
	if e.discard {
		if err := s.origin.Discard(off, cl); err != nil {
			return fmt.Errorf("snapshot: write-out of buffered origin chunk %d (discard): %w", e.c, err)
		}
		return nil
	}
	bs := int64(s.bs)
	nb := (cl + bs - 1) / bs
	isDirty := func(b int64) bool { return e.dirty[b/64]&(1<<(b%64)) != 0 }
	for b := int64(0); b < nb; {
		if !isDirty(b) {
			b++
			continue
		}
		end := b + 1
		for end < nb && isDirty(end) {
			end++
		}
		if _, err := s.origin.WriteAt(e.data[b*bs:min(end*bs, cl)], off+b*bs); err != nil {
			return fmt.Errorf("snapshot: write-out of buffered origin chunk %d: %w", e.c, err)
		}
		b = end
	}
	return nil
}

// takeOriginErr returns (and forgets) the first write-out failure not yet
// reported.
func (s *Store) takeOriginErr() error {
	s.ob.mu.Lock()
	defer s.ob.mu.Unlock()
	err := s.ob.err
	s.ob.err = nil
	return err
}

// flushOrigin is the origin volume's Flush: the buffered writes are
// written out and the origin flushed; a write-out failure since the last
// Flush is reported.
func (s *Store) flushOrigin() error {
	if err := s.usable(); err != nil {
		return err
	}
	var gens [maxSamples]uint64
	err := s.drainOrigin(s.ctx, false)
	if err == nil {
		// After the drain: its write-outs are covered by the Flush.
		gens = s.sampleGens()
		if err = s.origin.Flush(); err != nil {
			err = fmt.Errorf("snapshot: flush origin: %w", err)
		}
	}
	if err == nil {
		err = s.settleSamples(&gens)
	}
	if earlier := s.takeOriginErr(); err == nil && earlier != nil {
		err = earlier
	}
	return err
}

// readOrigin reads p at off of the live origin: the origin device, with
// buffered chunks read from the buffer.
func (s *Store) readOrigin(p []byte, off int64) error {
	if s.ob.n.Load() == 0 {
		_, err := s.origin.ReadAt(p, off)
		return err
	}
	for len(p) > 0 {
		c0 := uint64(off / s.cs)
		c1 := uint64((off + int64(len(p)) - 1) / s.cs)
		if c1-c0 >= maxSegChunks {
			c1 = c0 + maxSegChunks - 1
		}
		k := min(int64(len(p)), int64(c1+1)*s.cs-off)
		s.lockOrigin(c0, c1, false)
		base := off
		err := s.eachRun(off, off+k, c0, c1, func(lo, hi int64, e *obEntry) error {
			q := p[lo-base : hi-base]
			if e != nil {
				copy(q, e.data[lo-int64(e.c)*s.cs:])
				return nil
			}
			_, err := s.origin.ReadAt(q, lo)
			return err
		})
		s.unlockOrigin(c0, c1, false)
		if err != nil {
			return err
		}
		p, off = p[k:], off+k
	}
	return nil
}

// eachRun calls f for the byte ranges [lo, hi) of [off, end) (within
// chunks [c0, c1]): maximal runs of unbuffered chunks with e nil, and each
// buffered chunk's part with its entry.
func (s *Store) eachRun(off, end int64, c0, c1 uint64, f func(lo, hi int64, e *obEntry) error) error {
	for c := c0; c <= c1 && off < end; {
		e := s.bufferedLocked(c)
		next := c + 1
		for e == nil && next <= c1 && s.bufferedLocked(next) == nil {
			next++
		}
		hi := min(end, int64(next)*s.cs)
		if err := f(off, hi, e); err != nil {
			return err
		}
		off, c = hi, next
	}
	return nil
}
