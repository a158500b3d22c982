package blockdevtest

import (
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// FlushGate wraps a Device so that the first Flush after Arm waits until
// Release: a test can hold a flush in place (a commit, a group-commit
// leader) and act while it waits, without timing. It is one-shot: once
// released, an armed Flush no longer waits.
type FlushGate struct {
	blockdev.Device
	armed        atomic.Bool
	entered      chan struct{}
	release      chan struct{}
	enter, leave sync.Once // close entered and release once each
}

// NewFlushGate wraps dev; it passes every call through until Arm.
func NewFlushGate(dev blockdev.Device) *FlushGate {
	return &FlushGate{Device: dev, entered: make(chan struct{}), release: make(chan struct{})}
}

// Arm makes the next Flush wait for Release.
func (g *FlushGate) Arm() { g.armed.Store(true) }

// Entered is closed once the armed Flush is waiting.
func (g *FlushGate) Entered() <-chan struct{} { return g.entered }

// Release lets the waiting Flush (or the next armed one) go on.
func (g *FlushGate) Release() { g.leave.Do(func() { close(g.release) }) }

// Flush implements blockdev.Device.
func (g *FlushGate) Flush() error {
	if g.armed.CompareAndSwap(true, false) {
		g.enter.Do(func() { close(g.entered) })
		<-g.release
	}
	return g.Device.Flush()
}
