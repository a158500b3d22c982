package meta

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// stallGate blocks page reads while armed: the first read after arm
// signals entered and waits for open.
type stallGate struct {
	blockdev.Device
	armed   atomic.Bool
	entered chan struct{}
	open    chan struct{}
}

func (d *stallGate) ReadAt(p []byte, off int64) (int, error) {
	if d.armed.CompareAndSwap(true, false) {
		close(d.entered)
		<-d.open
	}
	return d.Device.ReadAt(p, off)
}

// stallHangGuard fails the test if ch is not closed in a minute: a hang
// guard, not a timing assertion (the old code never gets there at all).
func stallHangGuard(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(time.Minute):
		t.Fatalf("%s: still waiting after a minute (a lock held across device I/O?)", what)
	}
}

// TestLookupMissReadsUnlocked: a lookup that misses reads its page without
// the layer's lock, so a writer's change goes on while the read is stuck
// in the device; the lookup then answers right.
func TestLookupMissReadsUnlocked(t *testing.T) {
	mem, err := blockdev.NewMem(1024*PageSize, 4096)
	require.NoError(t, err)
	dev := &stallGate{Device: mem}
	m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: 16 << 10})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	want := make(map[uint64]uint64)
	for c := uint64(0); c < 4000; c += 2 {
		loc, err := m.PutData(Key{C: c, E: 1})
		require.NoError(t, err)
		want[c] = loc
	}
	require.NoError(t, m.Commit())
	// Evict what the fill left cached: the lookup below must read.
	for c := uint64(1); c < 4000 && m.CacheStats().Nodes > 2; c += 2 {
		_, err := m.PutData(Key{C: c, E: 1})
		require.NoError(t, err)
		require.NoError(t, m.Commit())
	}
	var q uint64
	for c := range want {
		if !stallCached(m, Key{C: c, E: 1}) {
			q = c
			break
		}
	}
	require.False(t, stallCached(m, Key{C: q, E: 1}), "every key is cached: the test would not read")
	dev.entered, dev.open = make(chan struct{}), make(chan struct{})
	dev.armed.Store(true)
	got := make(chan error, 1)
	go func() {
		loc, ok, err := m.Get(Key{C: q, E: 1})
		if err == nil && (!ok || loc != want[q]) {
			err = fmt.Errorf("Get %d: %d %v, want %d", q, loc, ok, want[q])
		}
		got <- err
	}()
	stallHangGuard(t, dev.entered, "the lookup's read")
	changed := make(chan struct{})
	go func() {
		defer close(changed)
		_, err := m.PutData(Key{B: 1, C: 1, E: 1})
		require.NoError(t, err)
	}()
	stallHangGuard(t, changed, "a change while a lookup reads")
	close(dev.open)
	require.NoError(t, <-got)
}

// stallCached reports whether the chunk tree's path to q is cached.
func stallCached(m *Meta, q Key) bool {
	_, _, err := m.GetNoRead(q)
	return err == nil
}

// TestLookupsUnlockedRace: lookups of every kind (Get, Seek, Prev,
// Ascend, AscendEpoch, NextEpoch, Prefetch, Load, GetNoRead) run while a
// writer puts and deletes keys among stable ones, commits, and writes
// back through a cache of a few nodes, so lookups miss, read unlocked and
// retry all the time. Each must see the stable keys exactly. Run it with
// -race.
func TestLookupsUnlockedRace(t *testing.T) {
	seed := blockdevtest.Seed(t)
	dev, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: 16 << 10})
	require.NoError(t, err)
	const chunks = 3000 // stable keys at even chunks and epoch 1, the writer's at odd chunks
	stable := make(map[uint64]uint64)
	for c := uint64(0); c < chunks; c += 2 {
		loc, err := m.PutData(Key{C: c, E: 1})
		require.NoError(t, err)
		stable[c] = loc
	}
	require.NoError(t, m.Commit())
	var notCached atomic.Int64
	stop := runReaders(t, 3, seed, 40, func(rr *rand.Rand) error {
		c := rr.Uint64N(chunks/2) * 2
		switch rr.IntN(6) {
		case 0:
			return checkStableLookup(m, stable, c)
		case 1:
			// Ascend from c over the next 20 stable keys: in order, each
			// exactly once, with the writer's keys between them.
			next, last := c, Key{}
			err := m.Ascend(Key{C: c}, func(k Key, loc uint64) bool {
				if k.C%2 == 0 && k.E == 1 {
					if k.C != next || loc != stable[k.C] {
						return false
					}
					next += 2
				}
				last = k
				return next < min(c+40, chunks)
			})
			if err == nil && next < min(c+40, chunks) {
				err = fmt.Errorf("Ascend from %d stopped at %v, want stable key %d", c, last, next)
			}
			return err
		case 2:
			// The epoch tree of epoch 1 holds the stable keys and the
			// writer's epoch-1 keys.
			next := c
			err := m.AscendEpoch(0, 1, c, func(x uint64) bool {
				if x%2 == 0 {
					if x != next {
						return false
					}
					next += 2
				}
				return next < min(c+40, chunks)
			})
			if err == nil && next < min(c+40, chunks) {
				err = fmt.Errorf("AscendEpoch from %d stopped before stable key %d", c, next)
			}
			return err
		case 3:
			e, ok, err := m.NextEpoch(0, 1)
			if err == nil && (!ok || e != 1) {
				err = fmt.Errorf("NextEpoch(0, 1): %d %v", e, ok)
			}
			return err
		case 4:
			if err := m.Prefetch(Key{C: c, E: 1}); err != nil {
				return err
			}
			return m.Load(Key{C: c, E: 1})
		default:
			loc, ok, err := m.GetNoRead(Key{C: c, E: 1})
			var nc *NotCachedError
			if errors.As(err, &nc) {
				notCached.Add(1)
				return nil
			}
			if err == nil && (!ok || loc != stable[c]) {
				err = fmt.Errorf("GetNoRead %d: %d %v, want %d", c, loc, ok, stable[c])
			}
			return err
		}
	})
	rng := rand.New(rand.NewPCG(seed, 9))
	live := make(map[Key]bool)
	rounds := 10
	if testing.Short() {
		rounds = 5
	}
	for range rounds {
		for range 400 {
			q := Key{C: rng.Uint64N(chunks/2)*2 + 1, E: uint32(1 + rng.IntN(3))}
			if live[q] {
				loc, err := m.Delete(q)
				require.NoError(t, err)
				require.NoError(t, m.FreeData(loc))
				delete(live, q)
			} else {
				_, err := m.PutData(q)
				require.NoError(t, err)
				live[q] = true
			}
		}
		require.NoError(t, m.Commit())
	}
	stop()
	require.Greater(t, m.CacheStats().Evicted, uint64(0), "the cache never evicted: the test did not exercise misses")
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
	t.Logf("GetNoRead found a page missing %d times", notCached.Load())
}

// stallWriteGate blocks page writes while closed.
type stallWriteGate struct {
	blockdev.Device
	mu     sync.Mutex
	closed bool
	cond   *sync.Cond
}

func (d *stallWriteGate) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	for d.closed {
		d.cond.Wait()
	}
	d.mu.Unlock()
	return d.Device.WriteAt(p, off)
}

func (d *stallWriteGate) set(closed bool) {
	d.mu.Lock()
	d.closed = closed
	d.cond.Broadcast()
	d.mu.Unlock()
}

// TestThrottleInsteadOfSelfWriteBack: with the write-back goroutine stuck
// in the device, changes go on past three quarters of the cache dirty
// without writing anything themselves (the old code wrote back inside the
// change, under the lock, and so hung here with the device); they flag the
// excess, and Throttle, called with no lock held, returns once write-back
// has caught up.
func TestThrottleInsteadOfSelfWriteBack(t *testing.T) {
	mem, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	dev := &stallWriteGate{Device: mem}
	dev.cond = sync.NewCond(&dev.mu)
	m, err := Format(dev, Options{DataChunks: 1 << 20, CacheBytes: 256 << 10})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	defer dev.set(false) // first: a failed test must not leave Close waiting on the device
	m.ResetStalls()
	dev.set(true)
	filled := make(chan struct{})
	go func() {
		defer close(filled)
		// Spread keys, so that each change dirties its own leaf.
		for i := uint64(0); i < 200_000 && !m.overHard.Load(); i++ {
			if _, err := m.PutData(Key{C: i * 7919 % 1_000_003, E: 1}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	stallHangGuard(t, filled, "changes while write-back is stuck in the device")
	require.True(t, m.overHard.Load(), "the dirty nodes never passed three quarters of the cache")
	require.Zero(t, m.Stalls().MaxSelfWrite, "a change wrote back itself")
	throttled := make(chan error, 1)
	go func() { throttled <- m.Throttle() }()
	dev.set(false)
	select {
	case err := <-throttled:
		require.NoError(t, err)
	case <-time.After(time.Minute):
		t.Fatal("Throttle after write-back resumed: still waiting after a minute")
	}
	require.False(t, m.overHard.Load())
	// Stalls times the wait (whether it waited for a page or found the
	// slots written by the time it looked).
	require.Positive(t, m.Stalls().MaxThrottle)
	require.LessOrEqual(t, m.Stalls().Throttled, uint64(1))
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
}
