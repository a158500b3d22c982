package snapshot

import (
	"errors"
	"fmt"
)

// The origin's preserved epochs, looked up on first use.
//
// preserved[c] is the greatest epoch of origin chunk c's entries (branch
// 0, live excluded). It is what the tree says, so it need not be stored:
// Open marks every chunk preservedUnknown instead of walking the chunk
// tree, and the first origin write to a chunk looks its epoch up (one
// Prev in the tree) under the chunk's origin stripe held exclusively and
// Store.mu, the two locks that guard the array. Open therefore costs the
// same whatever the history, and a chunk the workload never writes again
// costs no lookup at all.
//
// The value looked up is exact, where the array kept since Format is an
// upper bound (it never drops when a delete removes entries): both are
// correct, since a stale high value only covers epochs no snapshot holds
// any more (new snapshots get greater numbers).

// preservedUnknown marks a chunk whose preserved epoch has not been looked
// up since Open. It is epochLive, which no origin entry has, and greater
// than any held epoch: applyPut's "raise to o.e" leaves it unknown, and
// the lookup then sees o.e's entry in the tree.
const preservedUnknown = epochLive

// forgetPreserved marks every chunk's preserved epoch unknown (Open).
func (s *Store) forgetPreserved() {
	for i := range s.preserved {
		s.preserved[i] = preservedUnknown
	}
}

// anyUnknown reports whether a preserved epoch of [c0, c1] is unknown.
// Called with the chunks' origin stripes held.
func (s *Store) anyUnknown(c0, c1 uint64) bool {
	for c := c0; c <= c1; c++ {
		if s.preserved[c] == preservedUnknown {
			return true
		}
	}
	return false
}

// resolvePreserved looks up the unknown preserved epochs of [c0, c1].
// Called with their origin stripes held exclusively; takes Store.mu (both
// locks guard the array, so readers under either see no torn update).
func (s *Store) resolvePreserved(c0, c1 uint64) error {
	if !s.anyUnknown(c0, c1) {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := c0; c <= c1; c++ {
		if s.preserved[c] != preservedUnknown {
			continue
		}
		e, err := s.preservedLookup(c)
		if errors.Is(err, ErrClosed) {
			return err // a write that raced Close: nothing failed
		}
		if err != nil {
			return s.fail(err)
		}
		s.preserved[c] = e
	}
	return nil
}

// preservedLookup reads chunk c's preserved epoch from the index. Called
// with Store.mu held.
func (s *Store) preservedLookup(c uint64) (uint32, error) {
	x, ok, err := s.ix.last(0, c)
	if err != nil {
		return 0, metaErr(fmt.Sprintf("origin chunk %d's preserved epoch", c), err)
	}
	if !ok {
		return 0, nil
	}
	return x.e, nil
}

// preservedOf returns chunk c's preserved epoch, looking it up without
// keeping it when unknown (the caller may not hold c's stripe). Called
// with Store.mu held.
func (s *Store) preservedOf(c uint64) (uint32, error) {
	if e := s.preserved[c]; e != preservedUnknown {
		return e, nil
	}
	return s.preservedLookup(c)
}

// markCovered sets the chunk-group bits of a put that the tree's last
// commit already holds (Replay of a record up to treeSeq): the checkpoint
// image the bits come from may be older than that commit.
func (s *Store) markCovered(o *op, seq uint64) error {
	br := s.branches[o.b]
	if br == nil || o.n == 0 || o.c+o.n > s.chunkBound(o.b) || o.c+o.n < o.c {
		return fmt.Errorf("%w: record %d: put of chunks %d+%d on branch %d", ErrCorrupt, seq, o.c, o.n, o.b)
	}
	markGroups(br, o.c, o.n)
	return nil
}
