package bench

import (
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Setup is one engine built over fresh devices: the origin volume every
// write goes through, and the oldest snapshot (nil when there is none).
type Setup struct {
	Origin   blockdev.Device
	Snapshot blockdev.Device
	// Snap takes one more snapshot of the origin.
	Snap  func() error
	close []func() error
}

// Close releases the engine (not the pool's devices).
func (s *Setup) Close() error {
	var errs []error
	for i := len(s.close) - 1; i >= 0; i-- {
		errs = append(errs, s.close[i]())
	}
	return errors.Join(errs...)
}

// takeSnapshots takes n snapshots; on failure it closes s.
func (s *Setup) takeSnapshots(n int) (*Setup, error) {
	for range n {
		if err := s.Snap(); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Engine builds a Setup: an origin of originSize bytes (already holding
// the benchmark pattern) with snaps snapshots taken, chunk size chunk.
type Engine struct {
	Name string
	New  func(pool *Pool, originSize int64, chunk int64, snaps int) (*Setup, error)
}

// Engines lists the engines the origin benchmarks compare, in report order.
var Engines = []Engine{rawEngine}

// EngineByName finds an engine.
func EngineByName(name string) (Engine, error) {
	for _, e := range Engines {
		if e.Name == name {
			return e, nil
		}
	}
	return Engine{}, fmt.Errorf("bench: unknown engine %q", name)
}

// rawEngine is the baseline: the origin device itself, no snapshots
// possible. Its "snapshot" for read benchmarks is the origin.
var rawEngine = Engine{Name: "raw", New: func(pool *Pool, size, _ int64, snaps int) (*Setup, error) {
	dev, err := pool.Device("origin", size)
	if err != nil {
		return nil, err
	}
	if err := prefill(dev, size); err != nil {
		return nil, err
	}
	s := &Setup{Origin: dev, Snap: func() error { return nil }}
	if snaps > 0 {
		s.Snapshot = dev
	}
	return s, nil
}}

// newSetup builds an engine's Setup over a fresh pool, failing b's caller
// with a clear message.
func newSetup(env Env, e Engine, size, chunk int64, snaps int) (*Setup, *Pool, error) {
	pool, err := NewPool(env)
	if err != nil {
		return nil, nil, err
	}
	s, err := e.New(pool, size, chunk, snaps)
	if err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("engine %s, %d snapshots: %w", e.Name, snaps, err)
	}
	return s, pool, nil
}
