package exception

import "sync"

// nStripes is the number of lock stripes of a chunk table. Chunks hash to
// stripes; I/O to chunks in different stripes never touches the same lock,
// and no lock is held across device I/O, so I/O to chunks that share a
// stripe contends only for a map lookup.
const nStripes = 256

// table is a snapshot's exception lookup and its pending-exception
// tracking, striped by chunk.
type table struct {
	stripes [nStripes]stripe
}

// stripe guards the state of the chunks that hash to it.
type stripe struct {
	mu sync.Mutex
	// cond is broadcast when a chunk of this stripe stops being pending or
	// its users drain. Waiters re-check their own chunk, so a broadcast for
	// another chunk costs them a wake-up, never a wrong answer.
	cond sync.Cond
	exc  map[uint64]uint64      // completed exceptions: origin chunk -> COW chunk
	busy map[uint64]*chunkState // chunks with a pending exception or users
	free []*chunkState
	_    [64]byte // keep stripes on separate cache lines
}

// chunkState is the transient state of one chunk.
type chunkState struct {
	// pending: a COW, a snapshot write or a merge owns the chunk; anyone
	// who needs its mapping waits until it ends.
	pending bool
	// users counts I/O that relies on the chunk's current mapping staying
	// as it is: snapshot reads of the origin (no exception yet) and origin
	// writes redirected to a merging snapshot's COW chunk. The owner of a
	// pending state waits for them to drain before it changes the mapping
	// or lets the origin be written.
	users int
}

func (t *table) init() {
	for i := range t.stripes {
		s := &t.stripes[i]
		s.cond.L = &s.mu
		s.exc = make(map[uint64]uint64)
		s.busy = make(map[uint64]*chunkState)
	}
}

func (t *table) stripe(c uint64) *stripe {
	return &t.stripes[(c*0x9E3779B97F4A7C15)>>56]
}

// waitIdle waits, with s.mu held, until chunk c is not pending, and
// returns its state (nil if none).
func (s *stripe) waitIdle(c uint64) *chunkState {
	for {
		st := s.busy[c]
		if st == nil || !st.pending {
			return st
		}
		s.cond.Wait()
	}
}

func (s *stripe) state(c uint64) *chunkState {
	if st := s.busy[c]; st != nil {
		return st
	}
	var st *chunkState
	if n := len(s.free); n > 0 {
		st = s.free[n-1]
		s.free = s.free[:n-1]
	} else {
		st = new(chunkState)
	}
	s.busy[c] = st
	return st
}

// release forgets chunk c's state if nothing refers to it. s.mu is held.
func (s *stripe) release(c uint64, st *chunkState) {
	if !st.pending && st.users == 0 {
		delete(s.busy, c)
		s.free = append(s.free, st)
	}
}

// lookup returns chunk c's COW chunk, waiting out a pending exception.
// If there is none and use is set, it registers the caller as a user; the
// caller must call unuse when its I/O is done.
func (t *table) lookup(c uint64, use bool) (newChunk uint64, mapped bool) {
	s := t.stripe(c)
	s.mu.Lock()
	st := s.waitIdle(c)
	newChunk, mapped = s.exc[c]
	if !mapped && use {
		if st == nil {
			st = s.state(c)
		}
		st.users++
	}
	s.mu.Unlock()
	return newChunk, mapped
}

// lookupMapped is lookup for the redirect of a merging snapshot: it
// registers the caller as a user only when c is mapped.
func (t *table) lookupMapped(c uint64) (newChunk uint64, mapped bool) {
	s := t.stripe(c)
	s.mu.Lock()
	st := s.waitIdle(c)
	newChunk, mapped = s.exc[c]
	if mapped {
		if st == nil {
			st = s.state(c)
		}
		st.users++
	}
	s.mu.Unlock()
	return newChunk, mapped
}

// unuse ends a use registered by lookup.
func (t *table) unuse(c uint64) {
	s := t.stripe(c)
	s.mu.Lock()
	st := s.busy[c]
	st.users--
	if st.users == 0 {
		if st.pending {
			s.cond.Broadcast()
		}
		s.release(c, st)
	}
	s.mu.Unlock()
}

// begin takes ownership of chunk c (pending) unless it is already mapped
// (when wantMapped is false) or not mapped (when it is true). admit is
// called, with the stripe locked, just before ownership is taken; if it
// returns false, begin gives up and reports ok false and admitted false.
func (t *table) begin(c uint64, wantMapped bool, admit func() bool) (newChunk uint64, ok, admitted bool) {
	s := t.stripe(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.waitIdle(c)
	newChunk, mapped := s.exc[c]
	if mapped != wantMapped {
		return newChunk, false, true
	}
	if admit != nil && !admit() {
		return 0, false, false
	}
	if st == nil {
		st = s.state(c)
	}
	st.pending = true
	return newChunk, true, true
}

// drain waits until chunk c, which the caller owns, has no users.
func (t *table) drain(c uint64) {
	s := t.stripe(c)
	s.mu.Lock()
	for s.busy[c].users > 0 {
		s.cond.Wait()
	}
	s.mu.Unlock()
}

// end gives up ownership of chunk c after draining its users, mapping it
// to newChunk if set, unmapping it if unmap is set.
func (t *table) end(c, newChunk uint64, set, unmap bool) {
	s := t.stripe(c)
	s.mu.Lock()
	st := s.busy[c]
	for st.users > 0 {
		s.cond.Wait()
	}
	switch {
	case set:
		s.exc[c] = newChunk
	case unmap:
		delete(s.exc, c)
	}
	st.pending = false
	s.release(c, st)
	s.cond.Broadcast()
	s.mu.Unlock()
}

// insert maps c to newChunk (loading a store). No I/O runs yet.
func (t *table) insert(c, newChunk uint64) {
	s := t.stripe(c)
	s.mu.Lock()
	s.exc[c] = newChunk
	s.mu.Unlock()
}

// count returns the number of mapped chunks.
func (t *table) count() int {
	n := 0
	for i := range t.stripes {
		s := &t.stripes[i]
		s.mu.Lock()
		n += len(s.exc)
		s.mu.Unlock()
	}
	return n
}

// get returns c's COW chunk without waiting (for Check).
func (t *table) get(c uint64) (uint64, bool) {
	s := t.stripe(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.exc[c]
	return n, ok
}
