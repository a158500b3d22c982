package snapshot

import (
	"cmp"
	"slices"
)

// Replay in key order.
//
// Open after a crash replays the records logged since the last tree
// commit: up to about 65,536 index changes. Applied in log order, random
// writes touch leaves at random; when those leaves do not fit the page
// cache, each change reads a leaf, and write-back evicts it before the
// next change to it. Replay therefore defers the index changes and applies
// them sorted by (branch, chunk), so each leaf is read once and its
// changes land together.
//
// Reordering is safe because changes to different (branch, chunk) pairs
// commute: each touches its own keys, claims or frees its own data chunks
// (a chunk freed in the replayed window is held, never reused in it), and
// raises summaries that only grow. The sort is stable, so the changes to
// one pair keep their log order (a move is one change of its pair). What
// the index changes depend on, the branch table, is applied in log order
// at once; the deferred changes are applied before a branch is dropped (a
// dead branch's entries are deleted before the record that drops it) and
// at the end of the replay. A change of many chunks (a sequential write)
// is applied at once, after the deferred ones: its keys are together
// anyway, and splitting it would cost memory in proportion to its length.

// deferredOp is one replayed index change of one chunk.
type deferredOp struct {
	o   op
	seq uint64
}

// maxDeferredRun is the longest put or delete replay splits into
// per-chunk changes; longer ones are applied in log order.
const maxDeferredRun = 64

// replayDeferred replays a record that the tree's last commit does not
// cover. Called with the store's state being loaded (Open).
func (s *Store) replayDeferred(ops []op, seq uint64) error {
	for i := range ops {
		o := &ops[i]
		switch o.kind {
		case opPut, opDel:
			br := s.branches[o.b]
			lim := s.chunkBound(o.b)
			if br == nil || o.n == 0 || o.n > maxDeferredRun || o.c+o.n > lim || o.c+o.n < o.c {
				break // applied (or refused) below, in log order
			}
			for j := uint64(0); j < o.n; j++ {
				d := deferredOp{o: *o, seq: seq}
				d.o.c, d.o.n = o.c+j, 1
				if o.kind == opPut && o.loc < locInherit {
					d.o.loc = o.loc + j
				}
				s.deferred = append(s.deferred, d)
			}
			continue
		case opMove:
			s.deferred = append(s.deferred, deferredOp{o: *o, seq: seq})
			continue
		}
		if err := s.flushDeferred(); err != nil {
			return err
		}
		if err := s.applyOp(o, seq, true); err != nil {
			return err
		}
	}
	return nil
}

// flushDeferred applies the deferred index changes sorted by (branch,
// chunk), each pair's in log order.
func (s *Store) flushDeferred() error {
	if len(s.deferred) == 0 {
		return nil
	}
	slices.SortStableFunc(s.deferred, func(x, y deferredOp) int {
		return cmp.Or(cmp.Compare(x.o.b, y.o.b), cmp.Compare(x.o.c, y.o.c))
	})
	for i := range s.deferred {
		d := &s.deferred[i]
		if err := s.applyOp(&d.o, d.seq, true); err != nil {
			s.deferred = s.deferred[:0]
			return err
		}
	}
	s.deferred = s.deferred[:0]
	return nil
}
