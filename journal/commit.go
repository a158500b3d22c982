package journal

import (
	"context"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// batch is the image of one log batch being filled by Append: the header
// space, then the encoded records. Buffers are recycled, so the hot path
// allocates nothing per record once they have grown.
type batch struct {
	buf      []byte // aligned; len = header + records
	firstSeq uint64
	count    uint32
	reserved int64 // worst-case log bytes charged for it
}

// span is a batch written (or being written) to the log.
type span struct {
	apos, size int64
	firstSeq   uint64
	count      uint32
	epoch      uint64
}

// spanRing is a FIFO of spans in log order: the batches between the head
// and the tail of the log.
type spanRing struct {
	buf   []span
	first int
	n     int
}

func (r *spanRing) push(s span) {
	if r.n == len(r.buf) {
		nb := make([]span, max(16, 2*len(r.buf)))
		for i := range r.n {
			nb[i] = r.at(i)
		}
		r.buf, r.first = nb, 0
	}
	r.buf[(r.first+r.n)%len(r.buf)] = s
	r.n++
}

func (r *spanRing) at(i int) span { return r.buf[(r.first+i)%len(r.buf)] }

func (r *spanRing) pop() {
	r.first = (r.first + 1) % len(r.buf)
	r.n--
}

// worstBatch is the most log space a batch holding data bytes of records can
// take: its header, the records and padding to the next block.
func (j *Journal) worstBatch(data int64) int64 { return batchHdrSize + data + j.bs - 1 }

// Append queues a record (opaque bytes, at most MaxRecord; the journal
// copies them) and returns its sequence number. The record is durable once
// a later Commit returns. While the log is full, Append blocks until a
// checkpoint frees space, ctx is done or the journal is closed; it returns
// ErrNoSpace if the record could not fit even an empty log.
func (j *Journal) Append(ctx context.Context, payload []byte) (uint64, error) {
	if len(payload) > MaxRecord {
		return 0, fmt.Errorf("%w: %d bytes, at most %d", ErrTooLarge, len(payload), MaxRecord)
	}
	pcrc := payloadCRC(payload)
	rec := int64(recHdrSize + len(payload))
	j.mu.Lock()
	defer j.mu.Unlock()
	st := &j.st
	for {
		if err := j.usableLocked(); err != nil {
			return 0, err
		}
		if j.worstBatch(rec) > j.logSize {
			return 0, fmt.Errorf("%w: record of %d bytes, log of %d", ErrNoSpace, len(payload), j.logSize)
		}
		if st.tail-st.head+st.reserved+j.appendCostLocked(rec) <= j.logSize {
			break
		}
		// Full: ask for a checkpoint and wait for it to free space.
		j.signalNeedLocked()
		if err := j.waitLocked(ctx, st.space); err != nil {
			return 0, err
		}
	}
	b := j.openBatchLocked(rec)
	st.lastSeq++
	seq := st.lastSeq
	if b.count == 0 {
		b.firstSeq = seq
	}
	b.count++
	off := len(b.buf)
	b.buf = b.buf[:off+int(rec)]
	putRecordHeader(b.buf[off:], seq, len(payload), pcrc)
	copy(b.buf[off+recHdrSize:], payload)
	j.signalNeedLocked()
	return seq, nil
}

// Room reports whether Append of a payload of n bytes would find log space
// now, without waiting for a checkpoint.
func (j *Journal) Room(n int) bool {
	rec := int64(recHdrSize + n)
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.st.tail-j.st.head+j.st.reserved+j.appendCostLocked(rec) <= j.logSize
}

// appendCostLocked is the extra worst-case log space a record of rec bytes
// adds to the pending batches.
func (j *Journal) appendCostLocked(rec int64) int64 {
	if p := j.st.pending; len(p) > 0 && j.fits(p[len(p)-1], rec) {
		return rec
	}
	return j.worstBatch(rec)
}

func (j *Journal) fits(b *batch, rec int64) bool {
	return b.count == 0 || int64(len(b.buf))-batchHdrSize+rec <= j.batchTarget
}

// openBatchLocked returns the batch the next record of rec bytes goes into,
// with room for it, and charges its reservation.
func (j *Journal) openBatchLocked(rec int64) *batch {
	st := &j.st
	var b *batch
	if n := len(st.pending); n > 0 && j.fits(st.pending[n-1], rec) {
		b = st.pending[n-1]
		b.reserved += rec
		st.reserved += rec
	} else {
		if n := len(st.free); n > 0 {
			b = st.free[n-1]
			st.free = st.free[:n-1]
		} else {
			b = &batch{buf: blockdev.AlignedBuffer(int(j.bs))}
		}
		b.buf, b.count, b.firstSeq = b.buf[:batchHdrSize], 0, 0
		b.reserved = j.worstBatch(rec)
		st.reserved += b.reserved
		st.pending = append(st.pending, b)
	}
	// Grow so that the record and the padding to a block fit.
	need := int(roundUp(int64(len(b.buf))+rec, j.bs))
	if need > cap(b.buf) {
		nb := blockdev.AlignedBuffer(max(need, 2*cap(b.buf)))
		copy(nb, b.buf)
		b.buf = nb[:len(b.buf)]
	}
	return b
}

// Commit returns when every record appended before the call is durable.
// Group commit: one caller (the leader) writes every pending batch and
// issues one Flush; callers arriving meanwhile wait for it and then share
// the next round. A Commit with nothing new to make durable does no I/O.
// If ctx is done first, Commit returns ctx's error and the records stay
// queued (a later Commit makes them durable).
func (j *Journal) Commit(ctx context.Context) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.commitLocked(ctx, j.st.lastSeq); err != nil {
		return err
	}
	j.st.commits++
	return nil
}

// commitLocked returns when every record up to target is durable, leading
// commit rounds or waiting for other leaders' as needed. Called and returns
// with mu held.
func (j *Journal) commitLocked(ctx context.Context, target uint64) error {
	st := &j.st
	for {
		if st.err != nil {
			return st.err
		}
		if st.durableSeq >= target {
			return nil
		}
		if st.closed {
			return ErrClosed
		}
		if st.writing {
			if err := j.waitRoundLocked(ctx); err != nil {
				return err
			}
			continue
		}
		if err := j.leadLocked(); err != nil {
			return err
		}
	}
}

// leadLocked runs one group-commit round: PreCommit, write every pending
// batch, one Flush. Called and returns with mu held; mu is released during
// the I/O, while st.writing keeps other leaders out.
func (j *Journal) leadLocked() (err error) {
	st := &j.st
	st.writing = true
	j.io.Add(1)
	defer func() {
		st.writing = false
		st.roundGen++
		j.roundDone.Broadcast()
		j.io.Done()
	}()
	// Take every pending batch before PreCommit, so that the data it
	// flushes covers every record taken.
	taken := st.pending
	st.pending = st.spare[:0]
	st.spare = nil
	if len(taken) == 0 {
		st.spare = taken
		return fmt.Errorf("journal: internal error: commit round with nothing pending")
	}
	if pc := j.opts.PreCommit; pc != nil {
		j.mu.Unlock()
		err := pc()
		j.mu.Lock()
		if err == nil {
			err = j.usableLocked()
		} else {
			err = fmt.Errorf("journal: pre-commit: %w", err)
		}
		if err != nil {
			// Put the batches back in front of what was appended since.
			st.pending = append(taken, st.pending...)
			return err
		}
	}
	// Give each batch its place in the log.
	var last uint64
	var nbytes uint64
	for _, b := range taken {
		size := roundUp(int64(len(b.buf)), j.bs)
		h := batchHeader{count: b.count, id: j.id, apos: uint64(st.tail), epoch: j.epoch,
			firstSeq: b.firstSeq, length: uint32(len(b.buf) - batchHdrSize)}
		h.encode(b.buf)
		pad := b.buf[len(b.buf):size]
		clear(pad)
		b.buf = b.buf[:size]
		st.spans.push(span{apos: st.tail, size: size, firstSeq: b.firstSeq, count: b.count, epoch: j.epoch})
		st.tail += size
		st.reserved -= b.reserved
		last = b.firstSeq + uint64(b.count) - 1
		nbytes += uint64(size)
	}
	apos := st.tail - int64(nbytes)
	j.mu.Unlock()
	for _, b := range taken {
		if err == nil {
			err = j.logIO(b.buf, apos, true)
		}
		apos += int64(len(b.buf))
	}
	if err == nil {
		err = j.dev.Flush()
	}
	j.mu.Lock()
	st.free = append(st.free, taken...)
	st.spare = taken[:0]
	if err != nil {
		return j.failLocked(fmt.Errorf("journal: log write (reopen to recover): %w", err))
	}
	st.durableSeq = max(st.durableSeq, last)
	st.records += uint64(last - taken[0].firstSeq + 1)
	st.bytes += nbytes
	st.flushes++
	j.signalNeedLocked()
	return nil
}

// waitRoundLocked waits, releasing mu, until the commit round under way
// ends, ctx is done or the journal is closed. It allocates nothing unless
// ctx can be cancelled.
func (j *Journal) waitRoundLocked(ctx context.Context) error {
	gen := j.st.roundGen
	if ctx.Done() != nil {
		if err := ctx.Err(); err != nil {
			return err
		}
		stop := context.AfterFunc(ctx, func() {
			j.mu.Lock()
			j.roundDone.Broadcast()
			j.mu.Unlock()
		})
		defer stop()
	}
	for j.st.roundGen == gen && !j.st.closed {
		if err := ctx.Err(); err != nil {
			return err
		}
		j.roundDone.Wait()
	}
	return nil
}

// logIO reads or writes p at absolute log position apos, wrapping at the
// end of the log. len(p) is at most the log's size.
func (j *Journal) logIO(p []byte, apos int64, write bool) error {
	phys := apos % j.logSize
	n := min(int64(len(p)), j.logSize-phys)
	if err := j.devIO(p[:n], j.logOff+phys, write); err != nil {
		return err
	}
	if n < int64(len(p)) {
		return j.devIO(p[n:], j.logOff, write)
	}
	return nil
}

func (j *Journal) devIO(p []byte, off int64, write bool) error {
	var err error
	if write {
		_, err = j.dev.WriteAt(p, off)
	} else {
		_, err = j.dev.ReadAt(p, off)
	}
	return err
}
