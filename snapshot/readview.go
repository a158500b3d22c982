package snapshot

import (
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// readView gives an admin reader (Stat, Diff, Rollback's planning) the
// index as of one instant without holding Store.mu while it walks, so a
// long walk never stalls the writers.
//
// It freezes a tree commit under Store.mu and runs prep there, so the
// small state prep copies (branches, held epochs, volumes) is that of the
// same instant as the index. The commit is then written without the lock,
// and a meta.View of it is taken before the capture ends: no other tree
// commit can start while one is outstanding, so the view reads exactly the
// frozen transaction, the records applied up to the freeze included. (A
// view of the last commit alone would miss the records since, which the
// journal holds; forcing the commit keeps results exactly those of a walk
// under the lock, at the cost of a tree commit per call.) The writer waits
// only for the freeze, which is memory work.
//
// A store that cannot commit (read-only, failed or closed) has no writers
// to stall: prep runs under Store.mu held shared, which done releases, and
// the live index is returned. The caller walks the returned index and then
// calls done, which also releases the view.
//
// Without always, a store that logged nothing since its last tree commit
// reads that commit, which is the live index as long as every change to
// the index is logged; Check passes always, so that it also sees a change
// that was not (which is corruption, and what it looks for).
func (s *Store) readView(prep func(), always bool) (ix pagedIndex, done func(), err error) {
	return s.readViewCapture(func(*capture) { prep() }, always)
}

// readViewCapture is readView whose prep is also given the capture frozen
// under the same hold of Store.mu (nil where none was: the store cannot
// commit, or nothing was logged since the last tree commit), so that a
// caller can use its copy of the small state (Check: the volume records)
// rather than make another under the lock.
func (s *Store) readViewCapture(prep func(c *capture), always bool) (ix pagedIndex, done func(), err error) {
	if s.writable() != nil || s.j == nil {
		s.mu.RLock()
		prep(nil)
		return s.ix, s.mu.RUnlock, nil
	}
	s.mu.Lock()
	for s.capOut && s.failed.Load() == nil {
		s.capDone.Wait()
	}
	if s.failed.Load() != nil || s.closed.Load() {
		// Failed while waiting: walk the live index under the lock.
		prep(nil)
		return s.ix, s.mu.Unlock, nil
	}
	if !always && s.j.LastSeq() == s.lastTreeSeq {
		// Nothing logged since the last tree commit, which has ended
		// (no capture is outstanding): its view is the live index, and
		// a commit would only rewrite the small state (a Stat of each
		// volume of an idle store costs no write).
		prep(nil)
		v := s.m.View()
		s.mu.Unlock()
		return pagedIndex{r: v}, v.Release, nil
	}
	c, err := s.captureLocked()
	if err != nil {
		s.mu.Unlock()
		return pagedIndex{}, nil, err
	}
	prep(&c)
	var v *meta.View
	c.view = &v
	c.paced = true
	s.mu.UnlockYield() // an admin call: the writers waiting run first
	if err := s.writeCheckpoint(c); err != nil {
		if v != nil {
			v.Release()
		}
		return pagedIndex{}, nil, err
	}
	return pagedIndex{r: v}, v.Release, nil
}
