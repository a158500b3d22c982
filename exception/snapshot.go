package exception

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Options configures a snapshot. The zero value is a transient snapshot
// with 16 KiB chunks.
type Options struct {
	// ChunkSize is the copy unit in bytes: a power of two from the block
	// size of the origin and COW devices up to MaxChunkSize. 0 means
	// DefaultChunkSize. OpenSnapshot takes it from the store's header.
	ChunkSize int64
	// Persistent selects the kernel-format store; otherwise the mapping
	// lives in memory only.
	Persistent bool
	// Overflow: when a write to the snapshot finds the COW device full, the
	// snapshot enters the overflow state (writes needing a new chunk fail
	// with ErrOverflow, reads still work) instead of becoming invalid. The
	// kernel's "PO" store type.
	Overflow bool
}

// State is a snapshot's state.
type State int32

const (
	StateValid    State = iota // usable
	StateOverflow              // full: reads and writes to held chunks work; new chunks fail with ErrOverflow
	StateMerging               // being merged into the origin; its volume refuses I/O
	StateInvalid               // every access fails with ErrInvalidSnapshot
	StateClosed                // closed, deleted, or merged
)

func (s State) String() string {
	switch s {
	case StateValid:
		return "valid"
	case StateOverflow:
		return "overflow"
	case StateMerging:
		return "merging"
	case StateInvalid:
		return "invalid"
	case StateClosed:
		return "closed"
	}
	return fmt.Sprintf("state(%d)", int32(s))
}

// Snapshot is a snapshot of an Origin and, as a blockdev.Device, its
// volume: reads see the origin as it was when the snapshot was taken, and
// writes change the snapshot only.
type Snapshot struct {
	o          *Origin
	cow        blockdev.Device
	cs         int64
	shift      uint
	bs         int
	cowBS      int // cached: devices need not answer BlockSize after failing
	size       int64
	persistent bool
	overflowOK bool
	unlock     func() error // releases cow's lock (lock.go); called once, by shut or a failed open
	st         store
	tab        table
	state      atomic.Int32

	// ioGate is held shared by the snapshot volume's requests and
	// exclusively by shut and by the start of a merge, to drain them.
	ioGate  sync.RWMutex
	mergeMu sync.Mutex // one Merge call at a time
}

// CreateSnapshot takes a snapshot of the origin as it is now, keeping its
// exceptions on cow: formatted as a fresh persistent store if
// opts.Persistent, used as raw COW space otherwise. The origin is flushed
// first, so the snapshot holds what the origin durably held. The COW device
// is not closed when the snapshot is.
func (o *Origin) CreateSnapshot(cow blockdev.Device, opts Options) (*Snapshot, error) {
	if opts.ChunkSize == 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	s, err := o.newSnapshot(cow, opts.ChunkSize, opts)
	if err != nil {
		return nil, err
	}
	if opts.Persistent {
		p, err := formatPersistent(cow, opts.ChunkSize)
		if err != nil {
			_ = s.unlock()
			return nil, err
		}
		s.st = p
	} else {
		s.st = newTransient(cow.Size(), opts.ChunkSize)
	}
	if err := o.attach(s, true); err != nil {
		_ = s.st.close()
		_ = s.unlock()
		return nil, err
	}
	return s, nil
}

// OpenSnapshot attaches the persistent store on cow (one this package or
// the Linux kernel wrote) to the origin, after a restart or a crash. As with
// dm-snapshot, the origin must not have been written without the snapshot
// attached since the store was last used. The chunk size comes from the
// store's header. A store whose header says invalid opens in StateInvalid.
// To resume an interrupted merge, call Merge before using the origin.
func (o *Origin) OpenSnapshot(cow blockdev.Device, opts Options) (*Snapshot, error) {
	p, err := openPersistent(cow)
	if err != nil {
		return nil, err
	}
	opts.Persistent = true
	s, err := o.newSnapshot(cow, p.cs, opts)
	if err != nil {
		_ = p.close()
		return nil, err
	}
	s.st = p
	originChunks := uint64((o.size + p.cs - 1) / p.cs)
	for i, e := range p.list {
		if e.Old >= originChunks {
			_ = p.close()
			_ = s.unlock()
			return nil, fmt.Errorf("%w: exception %d: origin chunk %d beyond the origin's %d chunks", ErrCorrupt, i, e.Old, originChunks)
		}
		s.tab.insert(e.Old, e.New)
	}
	if p.invalid != nil {
		s.state.Store(int32(StateInvalid))
	}
	if err := o.attach(s, false); err != nil {
		_ = p.close()
		_ = s.unlock()
		return nil, err
	}
	return s, nil
}

func (o *Origin) newSnapshot(cow blockdev.Device, cs int64, opts Options) (*Snapshot, error) {
	bs := max(o.bs, cow.BlockSize())
	if err := checkChunkSize(cs, bs); err != nil {
		return nil, err
	}
	s := &Snapshot{o: o, cow: cow, cs: cs, shift: uint(bits.TrailingZeros64(uint64(cs))), bs: bs, cowBS: cow.BlockSize(),
		size: o.size - o.size%int64(bs), persistent: opts.Persistent, overflowOK: opts.Overflow}
	s.tab.init()
	unlock, err := lockDevice("COW", cow)
	if err != nil {
		return nil, err
	}
	s.unlock = unlock
	return s, nil
}

// attach adds s to the origin, draining origin I/O first.
func (o *Origin) attach(s *Snapshot, flush bool) error {
	o.gate.Lock()
	defer o.gate.Unlock()
	if o.closed.Load() {
		return fmt.Errorf("exception: origin: %w", blockdev.ErrClosed)
	}
	if o.merging != nil {
		return fmt.Errorf("exception: cannot add a snapshot while one merges: %w", ErrMerging)
	}
	if flush {
		// What the origin holds now is what the snapshot holds, crash or not.
		if err := o.dev.Flush(); err != nil {
			return fmt.Errorf("exception: flush origin: %w", err)
		}
	}
	o.snaps = append(o.snaps, s)
	return nil
}

// State returns the snapshot's state.
func (s *Snapshot) State() State { return State(s.state.Load()) }

// cowTarget reports whether origin writes must copy into s.
func (s *Snapshot) cowTarget() bool {
	st := s.State()
	return st == StateValid || st == StateOverflow
}

// usable returns the error an access to the volume gets in s's state.
func (s *Snapshot) usable() error {
	switch s.State() {
	case StateInvalid:
		u := s.st.usage()
		if u.invalid != nil {
			return fmt.Errorf("%w: %w", ErrInvalidSnapshot, u.invalid)
		}
		return ErrInvalidSnapshot
	case StateMerging:
		return ErrMerging
	case StateClosed:
		return fmt.Errorf("exception: snapshot: %w", blockdev.ErrClosed)
	}
	return nil
}

// invalidate makes s invalid because of cause; the origin carries on.
func (s *Snapshot) invalidate(cause error) {
	for {
		old := s.state.Load()
		if State(old) != StateValid && State(old) != StateOverflow {
			break
		}
		if s.state.CompareAndSwap(old, int32(StateInvalid)) {
			break
		}
	}
	s.st.invalidate(cause)
}

// chunkBytes returns how much of chunk c lies within the origin, and that
// rounded up to the COW device's block size.
func (s *Snapshot) chunkBytes(c uint64) (inOrigin, onCOW int64) {
	inOrigin = min(s.cs, s.o.size-int64(c)<<s.shift)
	cbs := int64(s.cowBS)
	return inOrigin, (inOrigin + cbs - 1) / cbs * cbs
}

// preserve copies every chunk of [off, off+n) that s does not hold yet.
// It returns only errNeedSlot; a failed copy invalidates s.
func (s *Snapshot) preserve(off, n int64, sl *slot) error {
	last := uint64(off+n-1) >> s.shift
	for c := uint64(off) >> s.shift; c <= last && s.cowTarget(); c++ {
		if err := s.cowChunk(c, sl); err != nil {
			return err
		}
	}
	return nil
}

// cowChunk copies origin chunk c into s unless s holds it already. Other
// requests for c wait until the copy is done.
func (s *Snapshot) cowChunk(c uint64, sl *slot) error {
	throttled := false
	_, owned, admitted := s.tab.begin(c, false, func() bool {
		ok, th := s.o.takeSlot(sl)
		throttled = th
		return ok
	})
	if !admitted {
		return errNeedSlot
	}
	if !owned {
		return nil
	}
	newChunk, err := s.copyIn(c)
	if throttled {
		s.o.putSlot()
	}
	if err != nil {
		s.tab.end(c, 0, false, false)
		s.invalidate(fmt.Errorf("copy of origin chunk %d: %w", c, err))
		return nil
	}
	s.tab.end(c, newChunk, true, false)
	return nil
}

// copyIn allocates a COW chunk, copies origin chunk c into it and commits
// the exception.
func (s *Snapshot) copyIn(c uint64) (uint64, error) {
	newChunk, seq, err := s.st.reserve(c)
	if err != nil {
		return 0, err
	}
	in, n := s.chunkBytes(c)
	b := getBuf(s.cs)
	buf := (*b)[:n]
	_, err = s.o.dev.ReadAt(buf[:in], int64(c)<<s.shift)
	if err == nil {
		clear(buf[in:])
		_, err = s.cow.WriteAt(buf, int64(newChunk)<<s.shift)
	}
	putBuf(b)
	if err := s.st.commit(seq, c, newChunk, err); err != nil {
		return 0, err
	}
	return newChunk, nil
}

func (s *Snapshot) check(off, n int64) error {
	if s.State() == StateClosed {
		return fmt.Errorf("exception: snapshot: %w", blockdev.ErrClosed)
	}
	return blockdev.CheckRange(off, n, s.size, s.bs)
}

// ReadAt implements blockdev.Device.
func (s *Snapshot) ReadAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	s.ioGate.RLock()
	defer s.ioGate.RUnlock()
	if err := s.usable(); err != nil {
		return 0, err
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		c := uint64(pos) >> s.shift
		in := pos - int64(c)<<s.shift
		k := int(min(int64(len(p)-done), s.cs-in))
		var err error
		if newChunk, mapped := s.tab.lookup(c, true); mapped {
			_, err = s.cow.ReadAt(p[done:done+k], int64(newChunk)<<s.shift+in)
		} else {
			_, err = s.o.dev.ReadAt(p[done:done+k], pos)
			s.tab.unuse(c)
		}
		if err != nil {
			return 0, err
		}
		done += k
	}
	return len(p), nil
}

// WriteAt implements blockdev.Device: it changes the snapshot only. A write
// covering a whole chunk the snapshot does not hold yet needs no copy of
// the origin's data.
func (s *Snapshot) WriteAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := s.write(p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard implements blockdev.Device: the range of the snapshot reads as
// zeros (they are written to its COW space); the origin is untouched.
func (s *Snapshot) Discard(off, n int64) error {
	if err := s.check(off, n); err != nil {
		return err
	}
	return s.write(nil, off, n)
}

func (s *Snapshot) write(p []byte, off, n int64) error {
	return s.o.retry(func(sl *slot) error {
		s.ioGate.RLock()
		defer s.ioGate.RUnlock()
		if err := s.usable(); err != nil {
			return err
		}
		for done := int64(0); done < n; {
			pos := off + done
			c := uint64(pos) >> s.shift
			in := pos - int64(c)<<s.shift
			k := min(n-done, s.cs-in)
			var q []byte
			if p != nil {
				q = p[done : done+k]
			}
			if err := s.writeChunk(c, in, k, q, sl); err != nil {
				return err
			}
			done += k
		}
		return nil
	})
}

// writeChunk writes q (zeros if nil, k bytes) at offset in of chunk c.
func (s *Snapshot) writeChunk(c uint64, in, k int64, q []byte, sl *slot) error {
	throttled := false
	newChunk, owned, admitted := s.tab.begin(c, false, func() bool {
		ok, th := s.o.takeSlot(sl)
		throttled = th
		return ok
	})
	if !admitted {
		return errNeedSlot
	}
	if !owned { // s holds c: write in place
		return writeOrZero(s.cow, q, int64(newChunk)<<s.shift+in, k)
	}
	newChunk, err := s.newException(c, in, k, q)
	if throttled {
		s.o.putSlot()
	}
	s.tab.end(c, newChunk, err == nil, false)
	return err
}

// newException gives s its own copy of chunk c with q written at in.
func (s *Snapshot) newException(c uint64, in, k int64, q []byte) (uint64, error) {
	if s.State() == StateOverflow {
		return 0, ErrOverflow
	}
	newChunk, seq, err := s.st.reserve(c)
	if errors.Is(err, ErrNoSpace) {
		if s.overflowOK && s.state.CompareAndSwap(int32(StateValid), int32(StateOverflow)) || s.State() == StateOverflow {
			return 0, fmt.Errorf("%w: %w", ErrOverflow, err)
		}
		s.invalidate(err)
		return 0, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	if err != nil {
		return 0, err
	}
	inOrigin, n := s.chunkBytes(c)
	base := int64(newChunk) << s.shift
	if in == 0 && k == inOrigin {
		err = writeOrZero(s.cow, q, base, k) // a whole chunk: no copy needed
	} else {
		b := getBuf(s.cs)
		buf := (*b)[:n]
		_, err = s.o.dev.ReadAt(buf[:inOrigin], int64(c)<<s.shift)
		if err == nil {
			clear(buf[inOrigin:])
			if q == nil {
				clear(buf[in : in+k])
			} else {
				copy(buf[in:], q)
			}
			_, err = s.cow.WriteAt(buf, base)
		}
		putBuf(b)
	}
	if err := s.st.commit(seq, c, newChunk, err); err != nil {
		if !errors.Is(err, ErrInvalidSnapshot) {
			s.invalidate(fmt.Errorf("write of chunk %d: %w", c, err))
		}
		return 0, err
	}
	return newChunk, nil
}

func writeOrZero(d blockdev.Device, q []byte, off, n int64) error {
	if q == nil {
		return writeZeros(d, off, n)
	}
	_, err := d.WriteAt(q, off)
	return err
}

// Flush implements blockdev.Device: the snapshot's own writes become
// durable. (Exceptions are durable when the write that made them returns.)
func (s *Snapshot) Flush() error {
	s.ioGate.RLock()
	defer s.ioGate.RUnlock()
	if err := s.usable(); err != nil {
		return err
	}
	return s.cow.Flush()
}

// Size implements blockdev.Device: the origin's size.
func (s *Snapshot) Size() int64 { return s.size }

// BlockSize implements blockdev.Device: the larger of the origin's and the
// COW device's block sizes.
func (s *Snapshot) BlockSize() int { return s.bs }

// ChunkSize returns the snapshot's chunk size in bytes.
func (s *Snapshot) ChunkSize() int64 { return s.cs }

// Close implements blockdev.Device: the snapshot is detached from the
// origin (origin writes stop copying into it at once). A persistent store
// stays valid on its COW device and can be opened again with OpenSnapshot
// as long as the origin is not written in between.
func (s *Snapshot) Close() error { return s.detach(false) }

// Delete detaches the snapshot like Close; a persistent store is also
// marked invalid on its COW device, so it can never be attached to an
// origin that has moved on.
func (s *Snapshot) Delete() error { return s.detach(true) }

func (s *Snapshot) detach(invalidate bool) error {
	o := s.o
	o.gate.Lock()
	if s.State() == StateClosed {
		o.gate.Unlock()
		return fmt.Errorf("exception: snapshot: %w", blockdev.ErrClosed)
	}
	if o.merging == s {
		o.gate.Unlock()
		return fmt.Errorf("exception: close of a snapshot being merged: %w", ErrMerging)
	}
	o.detach(s)
	o.gate.Unlock()
	if invalidate {
		s.st.invalidate(errors.New("snapshot deleted"))
	}
	return s.shut()
}

// shut drains the volume's I/O, marks s closed and stops its store. It
// runs after s left the origin's list (no origin I/O reaches it).
func (s *Snapshot) shut() error {
	s.ioGate.Lock()
	prev := State(s.state.Swap(int32(StateClosed)))
	s.ioGate.Unlock()
	if prev == StateClosed {
		return nil
	}
	defer func() { _ = s.unlock() }()
	return s.st.close()
}
