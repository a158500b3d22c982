package exception

import (
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// persistent is the kernel-format store (format.go) with a committer
// goroutine that batches exceptions across concurrent writers: the data of
// every exception in a batch is flushed once, the area blocks are written
// once and flushed once, and every waiter is released together.
//
// Exceptions are committed in allocation order (a reservation whose copy is
// slow holds back the ones after it, for a moment), so the list on disk is
// always a dense prefix of the allocations: a crash leaks no COW chunk.
type persistent struct {
	dev       blockdev.Device
	cs        int64
	bs        int
	epa       uint64
	devChunks uint64
	limit     uint64 // data chunks lie below it
	recOff    int64  // offset of the recovery record; -1 when not used

	mu sync.Mutex // guards the fields below; never held across I/O; taken after ioMu, never before it
	// nextFree is the next chunk to allocate.
	nextFree uint64
	// queue holds the reservations not yet committed, oldest first; head
	// is the sequence number of queue[0].
	queue     []pjob
	qbuf      []pjob
	head      uint64
	committed uint64 // exceptions on disk
	invalid   error
	chans     []chan error // free list of job channels

	ioMu   sync.Mutex // serialises metadata I/O; guards the fields below
	list   []Exception
	recSeq uint64
	// recDirty: the recovery record on the device may describe a change
	// (written this session, or repaired from at Open), so Close clears
	// it. A store opened and closed without a change writes nothing at
	// Close, so a COW device can be inspected through a read-only view.
	recDirty bool
	rec      []byte // record region buffer
	pre      []byte // pre-image block
	span     []byte // area blocks being written
	zero     []byte // zeros for clearing areas
	hdr      []byte
	batch    []pjob // the committer's current batch

	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

type jobState uint8

const (
	jobCopying  jobState = iota // the data copy is in progress
	jobReady                    // the data is written; waiting to commit
	jobFailed                   // the copy failed; the store will be invalidated
	jobResolved                 // given up (store invalid); nobody waits
)

type pjob struct {
	old, new uint64
	state    jobState
	err      error
	done     chan error
}

// newPersistent makes the runtime store for a device whose metadata (list,
// nextFree) is known, and starts its committer.
func newPersistent(dev blockdev.Device, cs int64, list []Exception, nextFree uint64, invalid error) *persistent {
	bs := dev.BlockSize()
	p := &persistent{
		dev: dev, cs: cs, bs: bs, epa: uint64(cs / entrySize), devChunks: uint64(dev.Size() / cs),
		list: list, nextFree: nextFree, committed: uint64(len(list)), invalid: invalid,
		rec: make([]byte, recordSize(bs)), pre: make([]byte, bs), hdr: make([]byte, bs),
		zero: make([]byte, min(cs, readPiece)),
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
	}
	p.limit = p.devChunks
	p.recOff = recordOffset(dev.Size(), bs)
	if p.recOff >= 2*cs {
		p.limit = min(p.devChunks, uint64(p.recOff/cs))
		for _, e := range list {
			if e.New >= p.limit { // a kernel-written image uses the record's blocks
				p.limit, p.recOff = p.devChunks, -1
				break
			}
		}
	} else {
		p.recOff = -1
	}
	go p.run()
	return p
}

// formatPersistent writes a fresh store (header, zeroed first area, no
// recovery record) to dev and returns it.
func formatPersistent(dev blockdev.Device, cs int64) (*persistent, error) {
	bs := dev.BlockSize()
	if err := checkChunkSize(cs, bs); err != nil {
		return nil, err
	}
	if dev.Size() < 3*cs+recordSize(bs) {
		return nil, fmt.Errorf("%w: COW device of %d bytes cannot hold a header, a metadata area and a chunk of %d bytes", ErrNoSpace, dev.Size(), cs)
	}
	p := newPersistent(dev, cs, nil, 2, nil)
	err := func() error {
		p.ioMu.Lock()
		defer p.ioMu.Unlock()
		if err := p.writeZeros(0, cs); err != nil { // header chunk and area 0
			return err
		}
		if err := p.writeZeros(cs, cs); err != nil {
			return err
		}
		encodeHeader(p.hdr, true, cs)
		if _, err := dev.WriteAt(p.hdr, 0); err != nil {
			return err
		}
		if p.recOff >= 0 {
			clear(p.rec)
			if _, err := dev.WriteAt(p.rec, p.recOff); err != nil {
				return err
			}
		}
		return dev.Flush()
	}()
	if err != nil {
		_ = p.close()
		return nil, fmt.Errorf("exception: format COW device: %w", err)
	}
	return p, nil
}

// openPersistent loads the store on dev, first undoing or finishing a torn
// area write that the recovery record describes.
func openPersistent(dev blockdev.Device) (*persistent, error) {
	hdr := make([]byte, dev.BlockSize())
	if dev.Size() < int64(len(hdr)) {
		return nil, fmt.Errorf("%w: device of %d bytes", ErrBadHeader, dev.Size())
	}
	if _, err := dev.ReadAt(hdr, 0); err != nil {
		return nil, fmt.Errorf("exception: read header: %w", err)
	}
	valid, cs, err := decodeHeader(hdr, dev.Size(), dev.BlockSize())
	if err != nil {
		return nil, err
	}
	var seq uint64
	var repaired bool
	if valid {
		if repaired, seq, err = repairFromRecord(dev, cs); err != nil {
			return nil, err
		}
	}
	img, err := LoadPersistent(dev)
	if err != nil {
		return nil, err
	}
	var inv error
	if !img.Valid {
		inv = fmt.Errorf("the persistent header says the snapshot is invalid")
		img.NextFree = 2
	}
	p := newPersistent(dev, cs, img.Entries, img.NextFree, inv)
	p.recSeq = seq
	p.recDirty = repaired
	return p, nil
}

func (p *persistent) getChan() chan error {
	if n := len(p.chans); n > 0 {
		ch := p.chans[n-1]
		p.chans = p.chans[:n-1]
		return ch
	}
	return make(chan error, 1)
}

func (p *persistent) poke() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *persistent) invalidErr() error {
	return fmt.Errorf("%w: %w", ErrInvalidSnapshot, p.invalid)
}

func (p *persistent) reserve(old uint64) (uint64, uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.invalid != nil {
		return 0, 0, p.invalidErr()
	}
	x := p.nextFree
	// The area after x's must be zeroable without touching the record.
	if x >= p.limit || (p.recOff >= 0 && isAreaChunk(x+1, p.epa) && x+1 >= p.limit) {
		return 0, 0, fmt.Errorf("%w: %d of %d chunks used", ErrNoSpace, x, p.limit)
	}
	p.nextFree = skipMeta(x+1, p.epa)
	if len(p.queue) == 0 {
		p.queue = p.qbuf[:0]
	}
	p.queue = append(p.queue, pjob{old: old, new: x, done: p.getChan()})
	if cap(p.queue) > cap(p.qbuf) {
		p.qbuf = p.queue[:0]
	}
	return x, p.head + uint64(len(p.queue)) - 1, nil
}

func (p *persistent) commit(seq, _, _ uint64, copyErr error) error {
	p.mu.Lock()
	j := &p.queue[seq-p.head]
	if p.invalid != nil {
		j.state = jobResolved
		err := p.invalidErr()
		p.mu.Unlock()
		p.poke()
		return err
	}
	j.state, j.err = jobReady, copyErr
	if copyErr != nil {
		j.state = jobFailed
	}
	ch := j.done
	p.mu.Unlock()
	p.poke()
	err := <-ch
	p.mu.Lock()
	p.chans = append(p.chans, ch)
	p.mu.Unlock()
	if copyErr != nil {
		return copyErr
	}
	return err
}

func (p *persistent) run() {
	defer close(p.done)
	for {
		select {
		case <-p.kick:
		case <-p.stop:
			return
		}
		for p.step() {
		}
	}
}

// step commits one batch, or releases waiters of an invalid store. It
// reports whether it did anything.
func (p *persistent) step() bool {
	p.mu.Lock()
	if p.invalid != nil {
		n := 0
		for n < len(p.queue) && p.queue[n].state != jobCopying {
			j := &p.queue[n]
			if j.state == jobResolved {
				p.chans = append(p.chans, j.done)
			} else {
				j.done <- p.invalidErr()
			}
			n++
		}
		p.pop(n)
		p.mu.Unlock()
		return n > 0
	}
	if len(p.queue) == 0 {
		p.mu.Unlock()
		return false
	}
	if j := p.queue[0]; j.state == jobFailed {
		p.mu.Unlock()
		p.invalidate(fmt.Errorf("copy to COW chunk %d: %w", j.new, j.err))
		return true
	}
	room := p.epa - p.committed%p.epa
	n := 0
	for n < len(p.queue) && uint64(n) < room && p.queue[n].state == jobReady {
		n++
	}
	if n == 0 {
		p.mu.Unlock()
		return false
	}
	p.batch = append(p.batch[:0], p.queue[:n]...)
	p.mu.Unlock()

	err := p.appendEntries(p.batch)

	p.mu.Lock()
	if err == nil {
		p.committed += uint64(n)
	}
	p.pop(n)
	p.mu.Unlock()
	if err != nil {
		p.invalidate(err)
		err = fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	for i := range p.batch {
		p.batch[i].done <- err
	}
	return true
}

// pop drops the first n queue entries. p.mu is held.
func (p *persistent) pop(n int) {
	clear(p.queue[:n])
	p.queue = p.queue[n:]
	p.head += uint64(n)
}

// appendEntries writes batch (all in one area) to disk: it is durable when
// it returns nil.
func (p *persistent) appendEntries(batch []pjob) error {
	p.ioMu.Lock()
	defer p.ioMu.Unlock()
	cnt := uint64(len(p.list))
	area, a := cnt/p.epa, cnt%p.epa
	for _, j := range batch {
		p.list = append(p.list, Exception{Old: j.old, New: j.new})
	}
	b := a + uint64(len(batch))
	err := p.writeArea(area, a, b, p.list[:cnt], p.list, func() error {
		if b < p.epa {
			return nil
		}
		// This batch fills the area: the next one must read as empty
		// before this one can read as full.
		if loc := areaLocation(area+1, p.epa); loc < p.devChunks {
			return p.writeZeros(int64(loc)*p.cs, p.cs)
		}
		return nil
	})
	if err != nil {
		p.list = p.list[:cnt]
	}
	return err
}

// writeArea changes entries [a, b) of area to what intended holds, where
// durable is the list as it is on disk. Order: recovery record (and
// before(), and the data the caller wrote) flushed, then the area blocks
// flushed. p.ioMu is held.
func (p *persistent) writeArea(area, a, b uint64, durable, intended []Exception, before func() error) error {
	perBlock := uint64(p.bs / entrySize)
	s := a - a%perBlock
	w := min((b+perBlock-1)/perBlock*perBlock, p.epa)
	n := int((w - s) * entrySize)
	if cap(p.span) < n {
		p.span = make([]byte, n)
	}
	span := p.span[:n]
	putEntries(span, intended, area, p.epa, s)
	if p.recOff >= 0 {
		putEntries(p.pre, durable, area, p.epa, s)
		p.recSeq++
		p.recDirty = true
		r := record{seq: p.recSeq, area: area, s: uint32(s), a: uint32(a), w: uint32(w),
			sectors: uint32(p.cs / sectorSize), crc: crc32.Checksum(span, castagnoli), pre: p.pre}
		r.encode(p.rec, p.bs)
		if _, err := p.dev.WriteAt(p.rec, p.recOff); err != nil {
			return fmt.Errorf("exception: write recovery record: %w", err)
		}
	}
	if err := before(); err != nil {
		return err
	}
	if err := p.dev.Flush(); err != nil {
		return fmt.Errorf("exception: flush before metadata area %d: %w", area, err)
	}
	off := int64(areaLocation(area, p.epa))*p.cs + int64(s)*entrySize
	if _, err := p.dev.WriteAt(span, off); err != nil {
		return fmt.Errorf("exception: write metadata area %d: %w", area, err)
	}
	if err := p.dev.Flush(); err != nil {
		return fmt.Errorf("exception: flush metadata area %d: %w", area, err)
	}
	return nil
}

func (p *persistent) writeZeros(off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(p.zero)))
		if _, err := p.dev.WriteAt(p.zero[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func (p *persistent) invalidate(cause error) {
	p.mu.Lock()
	first := p.invalid == nil
	if first {
		p.invalid = cause
	}
	p.mu.Unlock()
	if first {
		p.ioMu.Lock()
		encodeHeader(p.hdr, false, p.cs)
		// Best effort, as in the kernel: the store is unusable either way.
		_, _ = blockdev.WriteFUA(p.dev, p.hdr, 0)
		p.ioMu.Unlock()
	}
	p.poke()
}

func (p *persistent) tail(dst []Exception, n int) []Exception {
	p.ioMu.Lock()
	defer p.ioMu.Unlock()
	cnt := uint64(len(p.list))
	if cnt == 0 {
		return dst[:0]
	}
	first := max((cnt-1)/p.epa*p.epa, cnt-min(cnt, uint64(n)))
	return append(dst[:0], p.list[first:]...)
}

// removeTail clears the last n exceptions, all in the last area, after
// the origin copy of their data is durable (the kernel's commit_merge).
func (p *persistent) removeTail(n int) error {
	p.ioMu.Lock()
	defer p.ioMu.Unlock()
	cnt := uint64(len(p.list))
	area := (cnt - 1) / p.epa
	keep := cnt - uint64(n)
	err := p.writeArea(area, keep-area*p.epa, cnt-area*p.epa, p.list, p.list[:keep], func() error { return nil })
	if err != nil {
		return err
	}
	p.list = p.list[:keep]
	p.mu.Lock()
	p.committed = keep
	// As the kernel does: the value it would hold had every exception been
	// committed in order; only Status uses it while merging.
	p.nextFree = areaLocation(keep/p.epa, p.epa) + keep%p.epa + 1
	p.mu.Unlock()
	return nil
}

func (p *persistent) entries(fn func([]Exception)) {
	p.ioMu.Lock()
	defer p.ioMu.Unlock()
	fn(p.list)
}

func (p *persistent) usage() storeUsage {
	p.mu.Lock()
	defer p.mu.Unlock()
	return storeUsage{total: p.devChunks, used: p.nextFree, metadata: p.committed/p.epa + 2,
		exceptions: p.committed, inFlight: uint64(len(p.queue)), invalid: p.invalid}
}

// close stops the committer. The caller has drained all I/O. A valid store
// whose recovery record may describe a change clears it, so a later user of
// the device (such as the kernel, then us again) cannot mistake it for a
// current one; a store that changed nothing writes nothing.
func (p *persistent) close() error {
	close(p.stop)
	<-p.done
	p.mu.Lock()
	inv := p.invalid
	p.mu.Unlock()
	if inv != nil || p.recOff < 0 {
		return nil
	}
	p.ioMu.Lock()
	defer p.ioMu.Unlock()
	if !p.recDirty {
		return nil
	}
	clear(p.rec)
	if _, err := p.dev.WriteAt(p.rec, p.recOff); err != nil {
		return fmt.Errorf("exception: clear recovery record: %w", err)
	}
	return p.dev.Flush()
}
