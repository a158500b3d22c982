package blockdevtest

import (
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

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
