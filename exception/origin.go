// Package exception is the dm-snapshot model: an Origin wraps any
// blockdev.Device, and each snapshot of it keeps the origin's old data in
// an exception store on its own COW device. A store is transient (the
// mapping lives in memory; for short-lived backup snapshots) or persistent
// (the Linux kernel's on-disk format, so COW devices move between this
// package and dm-snapshot both ways; see format.go).
//
// The first write to an origin chunk copies it into every snapshot that
// does not hold it yet, once per snapshot: with N snapshots a first write
// costs N copies. That is the model's known cost, kept on purpose; package
// snapshot is the shared-store answer to it. Deleting a snapshot ends its
// cost at once.
//
// Concurrency: there is no lock on the I/O path that all requests share
// except a reader-writer gate that snapshot creation, deletion and the
// start and end of a merge take exclusively, to drain in-flight origin I/O.
// Each snapshot tracks pending exceptions per chunk in a striped table:
// writers to different chunks never wait for each other, and a reader of a
// chunk being copied waits for that chunk only. A bounded number of copies
// is in flight; a request that finds no free copy slot waits for one
// holding no lock at all, then retries (the kernel's 2019 dm-snapshot
// deadlock came from waiting on that throttle while holding the lock that
// snapshot creation needed). Persistent stores batch the commits of
// concurrent copies: one flush of the data and one metadata write for all.
package exception

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// DefaultMaxCOWs is the number of chunk copies in flight when
// OriginOptions.MaxCOWs is zero.
const DefaultMaxCOWs = 64

// OriginOptions configures an Origin. The zero value is a good default.
type OriginOptions struct {
	// MaxCOWs bounds the chunk copies in flight across all snapshots (each
	// holds a chunk-sized buffer). 0 means DefaultMaxCOWs.
	MaxCOWs int
}

// Origin is the volume that snapshots are taken of. All writes to the
// underlying device must go through it. It is a blockdev.Device.
type Origin struct {
	dev    blockdev.Device
	size   int64
	bs     int
	slots  chan struct{} // COW throttle: a token per copy in flight
	closed atomic.Bool
	unlock func() error // releases dev's lock (lock.go); called once, by Close

	// gate is held shared by every origin request for its whole duration,
	// and exclusively by snapshot create, open, close, delete and by the
	// start and end of a merge. Nobody waits for a COW slot while holding
	// it, and nothing that completes a copy needs it.
	//
	// Lock order in this package, outermost first: Snapshot.mergeMu,
	// Origin.gate, Snapshot.ioGate, a table stripe's mu. A persistent
	// store's ioMu comes before its mu. Stripe and store locks are leaves:
	// no other lock is taken while one is held.
	gate    sync.RWMutex
	snaps   []*Snapshot // guarded by gate
	merging *Snapshot   // guarded by gate
}

// errNeedSlot tells a request to drop its locks, wait for a COW slot and
// retry.
var errNeedSlot = errors.New("exception: need a COW slot")

// NewOrigin wraps dev. Closing the Origin does not close dev. A dev that
// is a blockdev.Locker is locked until Close (exclusively; shared when it
// is read-only): a second Origin over it fails with ErrLocked.
func NewOrigin(dev blockdev.Device, opts OriginOptions) (*Origin, error) {
	if opts.MaxCOWs < 0 {
		return nil, fmt.Errorf("exception: MaxCOWs %d is negative", opts.MaxCOWs)
	}
	if opts.MaxCOWs == 0 {
		opts.MaxCOWs = DefaultMaxCOWs
	}
	unlock, err := lockDevice("origin", dev)
	if err != nil {
		return nil, err
	}
	return &Origin{dev: dev, size: dev.Size(), bs: dev.BlockSize(), slots: make(chan struct{}, opts.MaxCOWs), unlock: unlock}, nil
}

// slot is a COW slot a request may hold across a retry.
type slot struct {
	held      bool // acquired by waiting; the next copy takes it over
	unlimited bool // the merge: one copy at a time, never throttled
}

// takeSlot gets a slot for a copy without waiting. throttled reports that
// the copy must give a slot back when it ends.
func (o *Origin) takeSlot(sl *slot) (ok, throttled bool) {
	switch {
	case sl.unlimited:
		return true, false
	case sl.held:
		sl.held = false
		return true, true
	}
	select {
	case o.slots <- struct{}{}:
		return true, true
	default:
		return false, false
	}
}

func (o *Origin) putSlot() { <-o.slots }

// retry runs fn until it does not ask for a COW slot, waiting for one
// between attempts with no lock held.
func (o *Origin) retry(fn func(sl *slot) error) error {
	var sl slot
	for {
		err := fn(&sl)
		if err != errNeedSlot {
			if sl.held {
				o.putSlot()
			}
			return err
		}
		o.slots <- struct{}{}
		sl.held = true
	}
}

func (o *Origin) check(off, n int64) error {
	if o.closed.Load() {
		return fmt.Errorf("exception: origin: %w", blockdev.ErrClosed)
	}
	return blockdev.CheckRange(off, n, o.size, o.bs)
}

// ReadAt implements blockdev.Device.
func (o *Origin) ReadAt(p []byte, off int64) (int, error) {
	if err := o.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	o.gate.RLock()
	defer o.gate.RUnlock()
	if o.closed.Load() {
		return 0, blockdev.ErrClosed
	}
	var err error
	if m := o.merging; m != nil {
		err = o.readMerging(m, p, off)
	} else {
		_, err = o.dev.ReadAt(p, off)
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements blockdev.Device: every snapshot that has no copy of a
// chunk written gets one before the origin is written.
func (o *Origin) WriteAt(p []byte, off int64) (int, error) {
	if err := o.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := o.write(p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard implements blockdev.Device; snapshots keep their view.
func (o *Origin) Discard(off, n int64) error {
	if err := o.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	return o.write(nil, off, n)
}

// write writes p (or discards, if p is nil) at off.
func (o *Origin) write(p []byte, off, n int64) error {
	return o.retry(func(sl *slot) error {
		o.gate.RLock()
		defer o.gate.RUnlock()
		if o.closed.Load() {
			return blockdev.ErrClosed
		}
		if m := o.merging; m != nil {
			return o.writeMerging(m, p, off, n, sl)
		}
		return o.writeThrough(p, off, n, sl)
	})
}

// writeThrough preserves [off, off+n) in every snapshot that needs it, then
// writes the origin. o.gate is held shared.
func (o *Origin) writeThrough(p []byte, off, n int64, sl *slot) error {
	if err := o.preserve(off, n, sl); err != nil {
		return err
	}
	if p == nil {
		return o.dev.Discard(off, n)
	}
	_, err := o.dev.WriteAt(p, off)
	return err
}

// preserve makes sure every snapshot that takes copies holds the origin's
// current data for [off, off+n). A snapshot whose copy fails is
// invalidated; only errNeedSlot is returned.
func (o *Origin) preserve(off, n int64, sl *slot) error {
	for _, s := range o.snaps {
		if err := s.preserve(off, n, sl); err != nil {
			return err
		}
	}
	return nil
}

// Flush implements blockdev.Device.
func (o *Origin) Flush() error {
	o.gate.RLock()
	defer o.gate.RUnlock()
	if o.closed.Load() {
		return blockdev.ErrClosed
	}
	if err := o.dev.Flush(); err != nil {
		return err
	}
	if m := o.merging; m != nil {
		// Writes to chunks not yet merged went to its COW device.
		return m.cow.Flush()
	}
	return nil
}

// Size implements blockdev.Device.
func (o *Origin) Size() int64 { return o.size }

// BlockSize implements blockdev.Device.
func (o *Origin) BlockSize() int { return o.bs }

// Close implements blockdev.Device. It closes every snapshot of the
// origin (persistent ones can be opened again with OpenSnapshot) and stops
// a merge in progress (Merge returns; a later OpenSnapshot and Merge
// resume it). It closes neither the origin's device nor the COW devices.
func (o *Origin) Close() error {
	o.gate.Lock()
	if o.closed.Swap(true) {
		o.gate.Unlock()
		return blockdev.ErrClosed
	}
	defer func() { _ = o.unlock() }()
	snaps := o.snaps
	o.snaps, o.merging = nil, nil
	o.gate.Unlock()
	var errs []error
	for _, s := range snaps {
		errs = append(errs, s.shut())
	}
	return errors.Join(errs...)
}

// Snapshots returns the snapshots attached to the origin.
func (o *Origin) Snapshots() []*Snapshot {
	o.gate.RLock()
	defer o.gate.RUnlock()
	return append([]*Snapshot(nil), o.snaps...)
}

// detach removes s from the snapshot list. o.gate is held exclusively.
func (o *Origin) detach(s *Snapshot) {
	for i, t := range o.snaps {
		if t == s {
			o.snaps = append(o.snaps[:i], o.snaps[i+1:]...)
			return
		}
	}
}

// Chunk buffers, pooled by size (a power of two), 4096-aligned for O_DIRECT
// devices.
var bufPools [32]sync.Pool

func getBuf(n int64) *[]byte {
	i := bits.Len64(uint64(n - 1))
	if v := bufPools[i].Get(); v != nil {
		return v.(*[]byte)
	}
	b := blockdev.AlignedBuffer(1 << i)
	return &b
}

func putBuf(b *[]byte) { bufPools[bits.Len64(uint64(len(*b)-1))].Put(b) }

// zeros is a read-only buffer of zeros for writing zeros through WriteAt.
var zeros = blockdev.AlignedBuffer(1 << 20)

// writeZeros writes n zero bytes at off.
func writeZeros(d blockdev.Device, off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := d.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}
