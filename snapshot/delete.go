package snapshot

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
)

// Delete is metadata-only and runs in the background. Deleting a snapshot
// (or a clone) removes its epoch from its branch's held set at once (one
// record); the collector then walks the entries keyed at that epoch (the
// byEpoch tree finds exactly them) and for each either re-keys it to the
// newest held epoch still inside its range (some other snapshot reads it)
// or drops it and frees its chunk. Every entry's epoch is held, so no other
// entry is affected. A snapshot that clones depend on becomes hidden (its
// epoch stays held by the clones) until the last of them goes; a deleted
// clone's branch is dropped once its entries are gone and nothing holds it,
// which may release a hidden parent in turn. Work left at Close resumes at
// the next Open (the queue is rebuilt from the index).

// gcBatch is the number of entries the collector handles per record.
const gcBatch = 512

// gcTask is a point whose entries the collector must look at, and the
// delete it belongs to (nil after a reopen).
type gcTask struct {
	p  point
	op *DeleteOp
}

// DeleteOp is a delete running in the background.
type DeleteOp struct {
	done    chan struct{}
	pending int // tasks queued or running; guarded by Store.mu
	err     error
	entries atomic.Int64
	freed   atomic.Int64
	cs      int64
}

// DeleteProgress reports a delete's progress.
type DeleteProgress struct {
	Entries        int64 // index entries handled so far
	BytesReclaimed int64 // store bytes freed so far
	Done           bool
}

// Wait blocks until the delete has finished (its freed chunks durable and
// reusable) or ctx is done.
func (d *DeleteOp) Wait(ctx context.Context) error {
	select {
	case <-d.done:
		return d.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Done is closed when the delete has finished.
func (d *DeleteOp) Done() <-chan struct{} { return d.done }

// Progress returns the delete's progress so far.
func (d *DeleteOp) Progress() DeleteProgress {
	p := DeleteProgress{Entries: d.entries.Load(), BytesReclaimed: d.freed.Load() * d.cs}
	select {
	case <-d.done:
		p.Done = true
	default:
	}
	return p
}

// Delete deletes the named snapshot or clone. It returns once the deletion
// is durable; the space is reclaimed in the background (see DeleteOp).
// Open handles on the volume fail with ErrInvalidSnapshot from then on.
// A protected volume is refused (ErrProtected), and so is a snapshot
// that clones depend on (ErrHasDependants): the *DependantsError lists
// them. DeleteWith deletes them first (Recursive) or lets the snapshot go
// as a hidden parent point that its clones keep (Detach).
func (s *Store) Delete(name string) (*DeleteOp, error) {
	return s.deleteOne(name, DeleteOptions{})
}

// deleteOne deletes one volume as Delete does, refused as opts says.
func (s *Store) deleteOne(name string, opts DeleteOptions) (*DeleteOp, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	s.mu.RLock()
	id, ok := s.byName[name]
	var br *branch
	if ok {
		br = s.branches[s.volumes[id].branch]
	}
	s.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if id == originVolumeID {
		return nil, fmt.Errorf("%w: the origin cannot be deleted", ErrBadOptions)
	}
	// The gate keeps writes of the branch out while its held set changes.
	br.gate.Lock()
	defer br.gate.Unlock()
	d := &DeleteOp{done: make(chan struct{}), cs: s.cs}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if err := s.makeLogRoom(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	v := s.volumes[id]
	if v == nil || v.hidden || s.byName[name] != id {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err := s.refuseLocked(v, s.dependantsLocked(v), opts); err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if v.kind == KindSnapshot && s.branches[v.branch].refs[v.epoch] > 1 {
		sc.ops = append(sc.ops, op{kind: opHide, id: id})
	} else {
		sc.ops = append(sc.ops, op{kind: opDropVolume, id: id})
	}
	before := len(s.gcq)
	_, err := s.logLocked(sc)
	for i := before; i < len(s.gcq); i++ {
		s.gcq[i].op = d
		d.pending++
	}
	if d.pending == 0 {
		close(d.done)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := s.commit(s.ctx); err != nil {
		return nil, err
	}
	v.dead.Store(true)
	if br.id == 0 {
		s.obKick() // the commit let the buffered origin writes out
	}
	return d, nil
}

// collector is the background goroutine that reclaims deleted volumes.
func (s *Store) collector() {
	defer s.wg.Done()
	for {
		s.mu.Lock()
		if len(s.gcq) == 0 {
			s.gcIdle.Broadcast()
			s.mu.Unlock()
			select {
			case <-s.ctx.Done():
				return
			case <-s.gcKick:
				continue
			}
		}
		t := s.gcq[0]
		s.mu.Unlock()
		err := s.collect(t)
		if s.ctx.Err() != nil {
			return // resumes at the next Open
		}
		if err == nil {
			// A tree commit, not just a journal commit: it makes the
			// freed chunks reusable now, so a finished delete shows
			// its space free.
			err = s.treeCommit(s.ctx)
		}
		s.mu.Lock()
		s.gcq = s.gcq[1:]
		if t.op != nil {
			if err != nil && t.op.err == nil {
				t.op.err = err
			}
			t.op.pending--
			if t.op.pending == 0 {
				close(t.op.done)
			}
		}
		s.mu.Unlock()
		if err != nil {
			// The collector stops here, so the store fails (sticky; a
			// page read error is not sticky by itself), unless Close
			// stopped it: a store that went on would hold entries
			// nothing collects until the next Open. Drain the queue's
			// waiters.
			if s.ctx.Err() == nil && !s.closed.Load() { // Close sets closed before it cancels
				err = s.fail(err)
			}
			s.failQueue(err)
			return
		}
	}
}

func (s *Store) failQueue(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.gcq {
		if t.op != nil {
			t.op.err = err
			t.op.pending--
			if t.op.pending == 0 {
				close(t.op.done)
			}
		}
	}
	s.gcq = nil
	s.gcIdle.Broadcast()
}

// WaitIdle waits until the collector has nothing left to do. A read-only
// store runs no collector: it returns at once.
func (s *Store) WaitIdle(ctx context.Context) error {
	if s.opts.ReadOnly {
		return nil
	}
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.gcIdle.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.gcq) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		if s.closed.Load() {
			return ErrClosed
		}
		s.gcIdle.Wait()
	}
	return nil
}

// collect handles every entry of t.p, batch by batch, then drops the branch
// if it is dead and empty.
func (s *Store) collect(t gcTask) error {
	var batch []entry
	var locs []uint64
	var stripes [nStripes]bool
	for {
		if s.ctx.Err() != nil {
			return s.ctx.Err()
		}
		batch = batch[:0]
		s.mu.RLock()
		br := s.branches[t.p.b]
		held := br != nil && (br.refs[t.p.e] > 0 || (t.p.e == epochLive && br.live))
		var werr error
		if br != nil && !held {
			werr = s.ix.epochEntries(t.p.b, t.p.e, 0, func(x entry) bool {
				batch = append(batch, x)
				return len(batch) < gcBatch
			})
		}
		s.mu.RUnlock()
		if werr != nil {
			return metaErr("index walk", werr)
		}
		if len(batch) == 0 {
			break
		}
		// The space map pages of the chunks the batch frees, read now
		// with no lock held, not one at a time under Store.mu and Meta.mu
		// as the frees reach them (a store whose map is paged out).
		locs = locs[:0]
		for _, x := range batch {
			if x.isData() {
				locs = append(locs, x.loc)
			}
		}
		s.m.ReadMapAhead(locs)
		clear(stripes[:])
		for _, x := range batch {
			stripes[s.stripeOf(x.b, x.c)] = true
		}
		s.lockStripes(t.p.b, &stripes)
		// A batch the metadata region has no room for (its worst case
		// counts every change) is retried in halves: one delete always
		// fits the layer's delete reserve.
		n := len(batch)
		err := s.collectBatch(t, br, batch[:n])
		for errors.Is(err, ErrNoSpace) && n > 1 {
			n /= 2
			err = s.collectBatch(t, br, batch[:n])
		}
		s.unlockStripes(t.p.b, &stripes)
		if err != nil {
			return err
		}
	}
	return s.maybeDropBranch(t)
}

func (s *Store) stripeOf(b uint32, c uint64) int {
	if b == 0 {
		return int(c % nStripes)
	}
	return int((c + uint64(b)*0x9E3779B9) % nStripes)
}

func (s *Store) lockStripes(b uint32, st *[nStripes]bool) {
	for i, on := range st {
		if !on {
			continue
		}
		if b == 0 {
			s.originLocks[i].Lock()
		} else {
			s.cloneLocks[i].Lock()
		}
	}
}

func (s *Store) unlockStripes(b uint32, st *[nStripes]bool) {
	for i, on := range st {
		if !on {
			continue
		}
		if b == 0 {
			s.originLocks[i].Unlock()
		} else {
			s.cloneLocks[i].Unlock()
		}
	}
}

func (s *Store) collectBatch(t gcTask, br *branch, batch []entry) error {
	sc := s.getScratch()
	defer s.putScratch(sc)
	sc.reclaiming = true
	if err := s.makeLogRoom(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	freed := int64(0)
	for _, x := range batch {
		cur, ok, err := s.ix.get(x.b, x.c, x.e)
		if err != nil {
			return metaErr("index lookup", err)
		}
		if !ok {
			continue
		}
		lo := uint32(0)
		p, ok, err := s.ix.prev(x.b, x.c, x.e)
		if err != nil {
			return metaErr("index lookup", err)
		}
		if ok {
			lo = p.e
		}
		if h := br.newestHeldBelow(lo, x.e); h != 0 {
			sc.ops = append(sc.ops, op{kind: opMove, b: x.b, c: x.c, e: x.e, e2: h})
			continue
		}
		if cur.isData() {
			freed++
		}
		if n := len(sc.ops); n > 0 && sc.ops[n-1].kind == opDel && sc.ops[n-1].c+sc.ops[n-1].n == x.c {
			sc.ops[n-1].n++
		} else {
			sc.ops = append(sc.ops, op{kind: opDel, b: x.b, e: x.e, c: x.c, n: 1})
		}
	}
	if len(sc.ops) == 0 {
		return nil
	}
	if _, err := s.logLocked(sc); err != nil {
		return err
	}
	if t.op != nil {
		t.op.entries.Add(int64(len(batch)))
		t.op.freed.Add(freed)
	}
	return nil
}

// maybeDropBranch drops t's branch if nothing needs it and it has no
// entries left; a hidden parent snapshot that only it held goes too (its
// collection is queued by the drop).
func (s *Store) maybeDropBranch(t gcTask) error {
	if err := s.makeLogRoom(); err != nil {
		return err
	}
	// The drop releases br's hold on its parent point (and may drop a
	// hidden parent snapshot): a change of the parent's held set, which
	// takes the parent's gate exclusively as Delete does, so that a write
	// of the parent that read its newest held epoch cannot log an entry
	// there after the epoch's collection (lock order: gate, then mu).
	s.mu.RLock()
	var up *branch
	if br := s.branches[t.p.b]; br != nil {
		up = br.up
	}
	s.mu.RUnlock()
	if up != nil {
		up.gate.Lock()
		defer up.gate.Unlock()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	br := s.branches[t.p.b]
	if br == nil || !br.dead() {
		return nil
	}
	if has, err := s.ix.branchHas(br.id); err != nil || has {
		return metaErr("index lookup", err)
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	sc.reclaiming = true
	sc.ops = append(sc.ops, op{kind: opDropBranch, id: uint64(br.id)})
	pp := point{br.parent, br.parentEpoch}
	if p := s.branches[pp.b]; p != nil && p.refs[pp.e] == 1 {
		if vid, ok := s.byPoint[pp]; ok && s.volumes[vid].hidden {
			sc.ops = append(sc.ops, op{kind: opDropVolume, id: vid})
		}
	}
	before := len(s.gcq)
	_, err := s.logLocked(sc)
	for i := before; i < len(s.gcq); i++ {
		s.gcq[i].op = t.op
		if t.op != nil {
			t.op.pending++
		}
	}
	return err
}

// invalidateFor makes room for an origin write to chunk c when the store
// is full (NoSpaceInvalidate): it deletes every snapshot of the origin
// that would need c copied. Called with c's origin stripe held
// exclusively; fails if one of them has clones or is protected.
func (s *Store) invalidateFor(c uint64) error {
	sc := s.getScratch()
	defer s.putScratch(sc)
	if err := s.makeLogRoom(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	br := s.b0
	pe, err := s.preservedOf(c)
	if err != nil {
		return err
	}
	for _, h := range br.held {
		if h <= pe {
			continue
		}
		vid, ok := s.byPoint[point{0, h}]
		if !ok || s.volumes[vid].hidden || br.refs[h] != 1 {
			return fmt.Errorf("%w: snapshot at epoch %d has clones and cannot be invalidated", ErrNoSpace, h)
		}
		if s.volumes[vid].protected {
			return fmt.Errorf("%w: snapshot %q is protected and cannot be invalidated", ErrNoSpace, s.volumes[vid].name)
		}
		sc.ops = append(sc.ops, op{kind: opDropVolume, id: vid})
	}
	if len(sc.ops) == 0 {
		return fmt.Errorf("%w: nothing to invalidate", ErrNoSpace)
	}
	_, err = s.logLocked(sc)
	return err
}
