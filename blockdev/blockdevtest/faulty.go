package blockdevtest

import (
	"fmt"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Op is a kind of device call, for fault injection.
type Op int

const (
	// OpAny matches every kind of call (counting them all together).
	OpAny Op = iota
	OpRead
	OpWrite
	OpFlush
	OpDiscard
	numOps
)

func (o Op) String() string {
	return [...]string{"any", "read", "write", "flush", "discard"}[o]
}

// Call describes one device call seen by Faulty.
type Call struct {
	Op  Op
	Off int64
	Len int64
	// N is the 1-based index of this call among calls of its kind; Total
	// among all calls.
	N, Total int
}

type faultRule struct {
	op    Op
	k     int
	from  bool // fail every call from the k-th on
	err   error
	match func(Call) error
}

// Faulty wraps a Device and fails chosen calls with chosen errors, for error
// sweeps: fail the k-th call for every k until a run completes with no fault.
// A failed write or discard does nothing (the device is not touched). It is
// safe for concurrent use.
type Faulty struct {
	dev blockdev.Device

	mu       sync.Mutex // guards the fields below
	counts   [numOps]int
	rules    []faultRule
	injected int
}

// NewFaulty wraps dev. With no rules it passes every call through.
func NewFaulty(dev blockdev.Device) *Faulty { return &Faulty{dev: dev} }

// FailNth makes the k-th call (1-based) of kind op fail with err.
func (f *Faulty) FailNth(op Op, k int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, faultRule{op: op, k: k, err: err})
}

// FailFrom makes every call of kind op from the k-th on fail with err: a
// device that died.
func (f *Faulty) FailFrom(op Op, k int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, faultRule{op: op, k: k, from: true, err: err})
}

// FailWhen fails every call for which match returns a non-nil error, with
// that error.
func (f *Faulty) FailWhen(match func(Call) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, faultRule{match: match})
}

// Clear removes every rule; counts are kept.
func (f *Faulty) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = nil
}

// Calls returns the number of calls seen so far (Close not included).
func (f *Faulty) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[OpAny]
}

// Injected returns the number of calls that were failed.
func (f *Faulty) Injected() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.injected
}

// Unwrap returns the wrapped device.
func (f *Faulty) Unwrap() blockdev.Device { return f.dev }

// fault counts the call and returns the error to fail it with, or nil.
func (f *Faulty) fault(op Op, off, n int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.counts[OpAny]++
	f.counts[op]++
	c := Call{Op: op, Off: off, Len: n, N: f.counts[op], Total: f.counts[OpAny]}
	for _, r := range f.rules {
		var err error
		switch {
		case r.match != nil:
			err = r.match(c)
		case r.op == OpAny && (c.Total == r.k || r.from && c.Total > r.k):
			err = r.err
		case r.op == op && (c.N == r.k || r.from && c.N > r.k):
			err = r.err
		}
		if err != nil {
			f.injected++
			return fmt.Errorf("blockdevtest: injected %s fault (call %d) at %d+%d: %w", op, c.Total, off, n, err)
		}
	}
	return nil
}

// ReadAt implements blockdev.Device.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.dev.ReadAt(p, off)
}

// WriteAt implements blockdev.Device.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.dev.WriteAt(p, off)
}

// Flush implements blockdev.Device.
func (f *Faulty) Flush() error {
	if err := f.fault(OpFlush, 0, 0); err != nil {
		return err
	}
	return f.dev.Flush()
}

// Discard implements blockdev.Device.
func (f *Faulty) Discard(off, n int64) error {
	if err := f.fault(OpDiscard, off, n); err != nil {
		return err
	}
	return f.dev.Discard(off, n)
}

// Size implements blockdev.Device.
func (f *Faulty) Size() int64 { return f.dev.Size() }

// BlockSize implements blockdev.Device.
func (f *Faulty) BlockSize() int { return f.dev.BlockSize() }

// Close implements blockdev.Device; it is never failed.
func (f *Faulty) Close() error { return f.dev.Close() }

// DelayOptions configures Delayed. Zero fields add nothing.
type DelayOptions struct {
	ReadLatency  time.Duration // added to every read
	WriteLatency time.Duration // added to every write and discard
	FlushLatency time.Duration // added to every flush (a disk whose flush takes 8 ms)
	// BytesPerSecond caps the bandwidth of reads and writes together, as a
	// shared link would; transfers queue behind each other.
	BytesPerSecond int64
}

// Delayed wraps a Device with per-operation latency and a bandwidth cap: a
// slow remote source, or a disk with an expensive flush. Latencies of
// concurrent calls overlap; bandwidth is shared.
type Delayed struct {
	dev  blockdev.Device
	opts DelayOptions

	mu       sync.Mutex // guards nextFree
	nextFree time.Time  // when the link is free for the next transfer
}

// NewDelayed wraps dev.
func NewDelayed(dev blockdev.Device, opts DelayOptions) *Delayed {
	return &Delayed{dev: dev, opts: opts}
}

func (d *Delayed) wait(latency time.Duration, n int) {
	until := time.Now().Add(latency)
	if d.opts.BytesPerSecond > 0 && n > 0 {
		xfer := time.Duration(float64(n) / float64(d.opts.BytesPerSecond) * float64(time.Second))
		d.mu.Lock()
		start := time.Now()
		if d.nextFree.After(start) {
			start = d.nextFree
		}
		d.nextFree = start.Add(xfer)
		done := d.nextFree.Add(latency)
		d.mu.Unlock()
		if done.After(until) {
			until = done
		}
	}
	if wait := time.Until(until); wait > 0 {
		time.Sleep(wait)
	}
}

// ReadAt implements blockdev.Device.
func (d *Delayed) ReadAt(p []byte, off int64) (int, error) {
	d.wait(d.opts.ReadLatency, len(p))
	return d.dev.ReadAt(p, off)
}

// WriteAt implements blockdev.Device.
func (d *Delayed) WriteAt(p []byte, off int64) (int, error) {
	d.wait(d.opts.WriteLatency, len(p))
	return d.dev.WriteAt(p, off)
}

// Flush implements blockdev.Device.
func (d *Delayed) Flush() error {
	d.wait(d.opts.FlushLatency, 0)
	return d.dev.Flush()
}

// Discard implements blockdev.Device.
func (d *Delayed) Discard(off, n int64) error {
	d.wait(d.opts.WriteLatency, 0)
	return d.dev.Discard(off, n)
}

// Size implements blockdev.Device.
func (d *Delayed) Size() int64 { return d.dev.Size() }

// BlockSize implements blockdev.Device.
func (d *Delayed) BlockSize() int { return d.dev.BlockSize() }

// Close implements blockdev.Device.
func (d *Delayed) Close() error { return d.dev.Close() }
