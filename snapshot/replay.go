package snapshot

import (
	"cmp"
	"slices"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Replay in key order.
//
// Open after a crash replays the records logged since the last tree
// commit: up to about 65,536 index changes, writing up to about 16,384
// leaves (treeCommitLeaves, checkpoint.go). Applied in log order, random
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
// chunk), each pair's in log order, in read-ahead windows: the layer
// reads the pages of a window's changes concurrently (meta.ReadAhead),
// then the window is applied, and only then is the next one read, so
// that what was read is not evicted before it is used.
func (s *Store) flushDeferred() error {
	if len(s.deferred) == 0 {
		return nil
	}
	defer func() { s.deferred = s.deferred[:0] }()
	slices.SortStableFunc(s.deferred, func(x, y deferredOp) int {
		return cmp.Or(cmp.Compare(x.o.b, y.o.b), cmp.Compare(x.o.c, y.o.c))
	})
	keys := s.replayKeys[:0]
	for i := range s.deferred {
		keys = appendReplayKeys(keys, &s.deferred[i].o)
	}
	s.replayKeys = keys
	for i, k := 0, 0; i < len(s.deferred); {
		n := len(keys) - k
		if !s.opts.noReadAhead {
			var err error
			if n, err = s.m.ReadAhead(keys[k:]); err != nil {
				return metaErr("replay read-ahead", err)
			}
		}
		s.replayWindows++
		// Apply the changes whose keys the window covers; at least one,
		// so that a window shorter than one change's keys still moves on.
		for lim, first := k+n, true; i < len(s.deferred); first = false {
			d := &s.deferred[i]
			nk := len(appendReplayKeys(s.replayKey[:0], &d.o))
			if !first && k+nk > lim {
				break
			}
			if err := s.applyOp(&d.o, d.seq, true); err != nil {
				return err
			}
			i, k = i+1, k+nk
		}
	}
	return nil
}

// appendReplayKeys appends the index keys that applying deferred change o
// puts or deletes: its own, and for a move the one it moves to.
func appendReplayKeys(keys []meta.Key, o *op) []meta.Key {
	keys = append(keys, metaKey(o.b, o.c, o.e))
	if o.kind == opMove {
		keys = append(keys, metaKey(o.b, o.c, o.e2))
	}
	return keys
}
