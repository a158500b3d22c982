package exception

import (
	"context"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// mergeBatch is the number of exceptions merged per metadata commit.
const mergeBatch = 64

// MergeProgress reports a merge's progress, in chunks.
type MergeProgress struct {
	Merged    uint64 // merged by this call so far
	Remaining uint64 // still in the snapshot's store
}

// Merge copies the snapshot back into its origin (a rollback), online. From
// the moment it starts, the origin reads as the snapshot: chunks not yet
// merged are read from, and written to, the snapshot's COW device, as the
// kernel's snapshot-merge target does. Other snapshots of the origin are
// preserved: each merged chunk is copied into them first, as any origin
// write would be. Exceptions are merged from the last backwards; each batch
// is removed from the store only after the origin copy is flushed, so a
// merge interrupted by a crash resumes where it stopped: open the snapshot
// again with OpenSnapshot and call Merge. If ctx ends, Merge returns its
// error and the snapshot stays merging (the origin keeps reading as the
// snapshot); call Merge again to go on. When it completes, the snapshot is
// closed and its COW device holds an empty store. progress, if not nil, is
// called after every batch.
func (s *Snapshot) Merge(ctx context.Context, progress func(MergeProgress)) error {
	s.mergeMu.Lock()
	defer s.mergeMu.Unlock()
	o := s.o
	o.gate.Lock()
	switch {
	case o.closed.Load() || s.State() == StateClosed:
		o.gate.Unlock()
		return fmt.Errorf("exception: merge: %w", blockdev.ErrClosed)
	case s.State() == StateInvalid:
		o.gate.Unlock()
		return fmt.Errorf("exception: merge: %w", ErrInvalidSnapshot)
	case s.cowBS > o.bs:
		o.gate.Unlock()
		return fmt.Errorf("exception: merge: COW block size %d above the origin's %d: %w", s.cowBS, o.bs, blockdev.ErrNotSupported)
	case o.merging != nil && o.merging != s:
		o.gate.Unlock()
		return fmt.Errorf("exception: another snapshot is merging: %w", ErrMerging)
	}
	o.merging = s
	// Drain the volume's own I/O; from now on it gets ErrMerging.
	s.ioGate.Lock()
	s.state.Store(int32(StateMerging))
	s.ioGate.Unlock()
	o.gate.Unlock()
	// The snapshot's own completed writes are what gets merged, crash or not.
	if err := s.cow.Flush(); err != nil {
		return fmt.Errorf("exception: merge: flush COW device: %w", err)
	}

	var merged uint64
	batch := make([]Exception, 0, mergeBatch)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("exception: merge stopped with %d chunks merged: %w", merged, err)
		}
		n, err := s.mergeStep(&batch)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		merged += uint64(n)
		if progress != nil {
			progress(MergeProgress{Merged: merged, Remaining: s.st.usage().exceptions})
		}
	}
	o.gate.Lock()
	o.merging = nil
	o.detach(s)
	o.gate.Unlock()
	return s.shut()
}

// mergeStep merges the last batch of exceptions and returns how many.
func (s *Snapshot) mergeStep(batch *[]Exception) (int, error) {
	o := s.o
	o.gate.RLock()
	defer o.gate.RUnlock()
	if o.closed.Load() {
		return 0, fmt.Errorf("exception: merge: %w", blockdev.ErrClosed)
	}
	*batch = s.st.tail(*batch, mergeBatch)
	b := *batch
	if len(b) == 0 {
		return 0, nil
	}
	owned := 0
	release := func(unmap bool) {
		for _, e := range b[:owned] {
			s.tab.end(e.Old, 0, false, unmap)
		}
	}
	for _, e := range b {
		if _, ok, _ := s.tab.begin(e.Old, true, nil); !ok {
			release(false)
			return 0, fmt.Errorf("%w: exception for chunk %d is in the store but not in the table", ErrCorrupt, e.Old)
		}
		owned++
	}
	if err := s.mergeCopy(b); err != nil {
		release(false)
		return 0, err
	}
	if err := s.st.removeTail(len(b)); err != nil {
		release(false)
		return 0, fmt.Errorf("exception: merge: remove exceptions: %w", err)
	}
	release(true)
	return len(b), nil
}

// mergeCopy writes the COW data of the batch to the origin, other
// snapshots first, and flushes the origin.
func (s *Snapshot) mergeCopy(b []Exception) error {
	o := s.o
	sl := slot{unlimited: true}
	buf := getBuf(s.cs)
	defer putBuf(buf)
	for _, e := range b {
		s.tab.drain(e.Old)
		in, n := s.chunkBytes(e.Old)
		off := int64(e.Old) << s.shift
		if err := o.preserve(off, in, &sl); err != nil {
			return fmt.Errorf("exception: merge: preserve chunk %d in other snapshots: %w", e.Old, err)
		}
		if _, err := s.cow.ReadAt((*buf)[:n], int64(e.New)<<s.shift); err != nil {
			return fmt.Errorf("exception: merge: read COW chunk %d: %w", e.New, err)
		}
		if _, err := o.dev.WriteAt((*buf)[:in], off); err != nil {
			return fmt.Errorf("exception: merge: write origin chunk %d: %w", e.Old, err)
		}
	}
	if err := o.dev.Flush(); err != nil {
		return fmt.Errorf("exception: merge: flush origin: %w", err)
	}
	return nil
}

// readMerging reads the origin as the merging snapshot m sees it.
func (o *Origin) readMerging(m *Snapshot, p []byte, off int64) error {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		c := uint64(pos) >> m.shift
		in := pos - int64(c)<<m.shift
		k := int(min(int64(len(p)-done), m.cs-in))
		var err error
		if newChunk, mapped := m.tab.lookup(c, false); mapped {
			_, err = m.cow.ReadAt(p[done:done+k], int64(newChunk)<<m.shift+in)
		} else {
			_, err = o.dev.ReadAt(p[done:done+k], pos)
		}
		if err != nil {
			return err
		}
		done += k
	}
	return nil
}

// writeMerging writes the origin while m merges: chunks m still holds are
// written in its COW device (the origin's copy of them is still what other
// snapshots may need), the rest go through the normal path.
func (o *Origin) writeMerging(m *Snapshot, p []byte, off, n int64, sl *slot) error {
	for done := int64(0); done < n; {
		pos := off + done
		c := uint64(pos) >> m.shift
		in := pos - int64(c)<<m.shift
		k := min(n-done, m.cs-in)
		var q []byte
		if p != nil {
			q = p[done : done+k]
		}
		var err error
		if newChunk, mapped := m.tab.lookupMapped(c); mapped {
			err = writeOrZero(m.cow, q, int64(newChunk)<<m.shift+in, k)
			m.tab.unuse(c)
		} else {
			err = o.writeThrough(q, pos, k, sl)
		}
		if err != nil {
			return err
		}
		done += k
	}
	return nil
}
