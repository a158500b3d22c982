package journal

import (
	"context"
	"fmt"
	"io"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ckptChunk is the checkpoint writer's and reader's buffer size: a
// checkpoint is streamed, never held whole in memory.
const ckptChunk = 1 << 20

// Checkpoint writes the engine's full state, which must reflect exactly the
// records with sequence <= upTo (the engine picks upTo as the last sequence
// it appended, under the same lock it captured its state with); records
// after upTo are replayed on top of it at Open.
//
// write streams the state into w (any size up to the slot size; more gives
// ErrNoSpace). Checkpoint writes it to the inactive slot, commits the
// records up to upTo if they are still pending, flushes, calls
// Options.PreCommit, then switches the superblock to it (a write and a
// flush), and only then frees the log space holding records <= upTo and
// wakes Appends waiting for space. Until the switch is durable the previous
// checkpoint stays current, so a crash at any point leaves the old or the
// new checkpoint, whole.
//
// Checkpoint runs concurrently with Append and Commit; concurrent
// Checkpoint calls run one at a time. upTo must lie between the current
// checkpoint's upTo and LastSeq. If write fails, Checkpoint returns its
// error and the current checkpoint stays.
func (j *Journal) Checkpoint(ctx context.Context, upTo uint64, write func(w io.Writer) error) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	j.mu.Lock()
	if err := j.usableLocked(); err != nil {
		j.mu.Unlock()
		return err
	}
	if upTo > j.st.lastSeq || upTo < j.st.ckptUpTo {
		err := fmt.Errorf("journal: checkpoint upTo %d outside [%d, %d]", upTo, j.st.ckptUpTo, j.st.lastSeq)
		j.mu.Unlock()
		return err
	}
	j.io.Add(1)
	j.mu.Unlock()
	defer j.io.Done()

	slot := uint32(0)
	if j.sb.ckpt.gen != 0 {
		slot = 1 - j.sb.ckpt.slot
	}
	if j.ckptBuf == nil {
		j.ckptBuf = blockdev.AlignedBuffer(int(min(ckptChunk, j.slotSize)))
	}
	w := &slotWriter{j: j, ctx: ctx, off: j.slotOff(slot), crc: saltCheckpoint, buf: j.ckptBuf[:0]}
	if err := write(w); err != nil {
		return fmt.Errorf("journal: checkpoint: %w", err)
	}
	if err := w.finish(); err != nil {
		return fmt.Errorf("journal: checkpoint: %w", err)
	}
	// Write every record up to upTo to the log (usually already done), so
	// that the switch frees all of them, reservations included: a log full
	// of appended but uncommitted records is emptied by a checkpoint too.
	j.mu.Lock()
	err := j.commitLocked(ctx, upTo)
	j.mu.Unlock()
	if err != nil {
		return fmt.Errorf("journal: checkpoint: %w", err)
	}
	if err := j.dev.Flush(); err != nil {
		return j.fail(fmt.Errorf("journal: checkpoint flush: %w", err))
	}
	if pc := j.opts.PreCommit; pc != nil {
		if err := pc(); err != nil {
			return fmt.Errorf("journal: checkpoint pre-commit: %w", err)
		}
	}

	// Switch. Replay will start at the first batch holding a record after
	// upTo; batches taken later are written at or after the tail.
	j.mu.Lock()
	if err := j.usableLocked(); err != nil {
		j.mu.Unlock()
		return err
	}
	start, startEpoch := j.st.tail, j.epoch
	for i := range j.st.spans.n {
		s := j.st.spans.at(i)
		if s.firstSeq+uint64(s.count)-1 > upTo {
			start, startEpoch = s.apos, s.epoch
			break
		}
	}
	j.mu.Unlock()
	next := j.sb
	next.gen++
	next.ckpt = checkpointRef{gen: j.sb.ckpt.gen + 1, slot: slot, crc: w.crc, length: uint64(w.n),
		upTo: upTo, start: uint64(start), startEpoch: startEpoch}
	if err := j.writeSuperblock(&next); err != nil {
		// The superblock copy may or may not have reached the disk; the
		// only safe course is to stop until the journal is reopened.
		return j.fail(fmt.Errorf("journal: checkpoint switch: %w", err))
	}
	j.sb = next

	// The new checkpoint is durable: free the log before start.
	j.mu.Lock()
	defer j.mu.Unlock()
	st := &j.st
	for st.spans.n > 0 && st.spans.at(0).apos < start {
		st.spans.pop()
	}
	st.head = start
	st.ckptUpTo = upTo
	st.ckptBytes = w.n
	st.checkpoints++
	close(st.space)
	st.space = make(chan struct{})
	return nil
}

// fail makes err the journal's sticky error (if it has none) and returns it.
func (j *Journal) fail(err error) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.failLocked(err)
}

// failLocked makes err the sticky error (if there is none yet), wakes every
// Append waiting for space so it sees it, and returns the sticky error.
func (j *Journal) failLocked(err error) error {
	if j.st.err == nil {
		j.st.err = err
		close(j.st.space)
		j.st.space = make(chan struct{})
	}
	return j.st.err
}

func (j *Journal) slotOff(slot uint32) int64 { return 2*j.bs + int64(slot)*j.slotSize }

// slotWriter streams a checkpoint into a slot through a chunk buffer,
// computing the stream's CRC.
type slotWriter struct {
	j   *Journal
	ctx context.Context
	off int64 // slot's device offset
	n   int64 // bytes accepted so far
	crc uint32
	buf []byte // pending bytes, written at off + n - len(buf)
	err error
}

// Write implements io.Writer.
func (w *slotWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if w.n+int64(len(p)) > w.j.slotSize {
		w.err = fmt.Errorf("%w: checkpoint larger than its %d-byte slot", ErrNoSpace, w.j.slotSize)
		return 0, w.err
	}
	done := 0
	for done < len(p) {
		k := copy(w.buf[len(w.buf):cap(w.buf)], p[done:])
		w.buf = w.buf[:len(w.buf)+k]
		done += k
		w.n += int64(k)
		if len(w.buf) == cap(w.buf) {
			if err := w.flushChunk(); err != nil {
				return done, err
			}
		}
	}
	return done, nil
}

// flushChunk writes the buffered bytes (padded to a block) to the slot.
func (w *slotWriter) flushChunk() error {
	if err := w.ctx.Err(); err != nil {
		w.err = err
		return err
	}
	w.j.mu.Lock()
	closed := w.j.st.closed
	w.j.mu.Unlock()
	if closed {
		w.err = ErrClosed
		return w.err
	}
	w.crc = crc(w.crc, w.buf)
	size := int(roundUp(int64(len(w.buf)), w.j.bs))
	clear(w.buf[len(w.buf):size])
	if _, err := w.j.dev.WriteAt(w.buf[:size], w.off+w.n-int64(len(w.buf))); err != nil {
		w.err = err
		return err
	}
	w.buf = w.buf[:0]
	return nil
}

func (w *slotWriter) finish() error {
	if w.err != nil {
		return w.err
	}
	if len(w.buf) > 0 {
		return w.flushChunk()
	}
	return nil
}

// loadCheckpoint verifies the current checkpoint's length and CRC, then
// streams it to r.LoadCheckpoint.
func (j *Journal) loadCheckpoint(r Replayer) error {
	c := j.sb.ckpt
	buf := blockdev.AlignedBuffer(int(min(ckptChunk, roundUp(max(int64(c.length), 1), j.bs))))
	rd := &slotReader{j: j, off: j.slotOff(c.slot), left: int64(c.length), want: c.crc, crc: saltCheckpoint, buf: buf}
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return err
	}
	rd = &slotReader{j: j, off: j.slotOff(c.slot), left: int64(c.length), want: c.crc, crc: saltCheckpoint, buf: buf}
	if err := r.LoadCheckpoint(rd); err != nil {
		return fmt.Errorf("journal: load checkpoint: %w", err)
	}
	return nil
}

// slotReader streams a checkpoint from its slot and checks its CRC at the
// end of the stream.
type slotReader struct {
	j         *Journal
	off       int64 // device offset of the next chunk
	left      int64 // stream bytes not yet read from the device
	want, crc uint32
	buf       []byte
	avail     []byte // read, not yet returned
}

// Read implements io.Reader.
func (r *slotReader) Read(p []byte) (int, error) {
	if len(r.avail) == 0 {
		if r.left == 0 {
			if r.crc != r.want {
				return 0, corruptAt("checkpoint", r.off, "checksum %#x, want %#x", r.crc, r.want)
			}
			return 0, io.EOF
		}
		n := min(r.left, int64(len(r.buf)))
		size := roundUp(n, r.j.bs)
		if _, err := r.j.dev.ReadAt(r.buf[:size], r.off); err != nil {
			return 0, fmt.Errorf("journal: read checkpoint: %w", err)
		}
		r.off += size
		r.left -= n
		r.avail = r.buf[:n]
		r.crc = crc(r.crc, r.avail)
	}
	k := copy(p, r.avail)
	r.avail = r.avail[k:]
	return k, nil
}
