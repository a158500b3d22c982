package meta

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestViewsConcurrent: readers open views and compare them with the model
// of the commit they read while the writer changes, writes back and
// commits, with a cache small enough to evict. Run it with -race.
func TestViewsConcurrent(t *testing.T) {
	seed := blockdevtest.Seed(t)
	_, m := newMemMeta(t, 4096, 1<<16, 64<<10)
	rng := rand.New(rand.NewPCG(seed, 5))
	w := &workload{t: t, rng: rng, m: m, md: newModel(), space: keySpace{branches: 2, chunks: 1500, epochs: 4}}
	var mu sync.Mutex // guards models
	models := map[uint64]*model{committedTx(m): newModel()}
	rounds := 15
	if testing.Short() {
		rounds = 10
	}
	stop := runReaders(t, 3, seed, 10, func(rr *rand.Rand) error {
		v := m.View()
		defer v.Release()
		mu.Lock()
		md := models[v.Tx()]
		mu.Unlock()
		if md == nil { // committed, model not recorded yet
			return nil
		}
		for range 20 {
			q := w.space.random(rr)
			got, loc, ok, err := v.Seek(q)
			if err != nil {
				return err
			}
			want, wok := md.seek(q)
			if ok != wok || ok && (got != want || loc != md.locs[want]) {
				return errMismatch
			}
		}
		return nil
	})
	for range rounds {
		for range 100 {
			w.step()
		}
		require.NoError(t, m.Commit())
		mu.Lock()
		models[committedTx(m)] = w.md.clone()
		mu.Unlock()
	}
	stop()
	require.NoError(t, m.Check())
}

// runReaders runs n goroutines that call fn, each with its own random
// source (seed, stream+g), until the returned stop is called or fn fails.
// stop waits for them and fails t with the first error.
func runReaders(t *testing.T, n int, seed, stream uint64, fn func(rr *rand.Rand) error) (stop func()) {
	done := make(chan struct{})
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for g := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rr := rand.New(rand.NewPCG(seed, stream+uint64(g)))
			for {
				select {
				case <-done:
					return
				default:
				}
				if err := fn(rr); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	return func() {
		close(done)
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
	}
}

var errMismatch = errorString("a view disagrees with the model of its commit")

type errorString string

func (e errorString) Error() string { return string(e) }

// committedTx is the last committed transaction.
func committedTx(m *Meta) uint64 {
	v := m.View()
	defer v.Release()
	return v.Tx()
}

// TestCommitWhileWriting: a writer puts keys 0, 1, 2, ... while another
// goroutine commits in a loop (commits write without the writer's lock),
// and the power is cut at a random moment. After reopen the keys must be
// a prefix of the writer's sequence, at least as long as what the last
// returned Commit covered, and Check must pass. Run it with -race.
func TestCommitWhileWriting(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 6))
	rounds := 6
	if testing.Short() {
		rounds = 2
	}
	for round := range rounds {
		pol := blockdevtest.AllPolicies(seed + uint64(round))[round%4]
		pc := blockdevtest.NewPowerCut(blockdevtest.OpWrite, 0, pol)
		dev := pc.NewDevice(t, "meta", 2048*PageSize, 4096)
		m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: 8 << 10}) // background write-back all the time
		require.NoError(t, err)
		pc.Arm(blockdevtest.OpWrite, 200+rng.IntN(600))
		var mu sync.Mutex // guards put
		put := 0          // keys put so far: 0..put-1
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; ; i++ {
				if _, err := m.PutData(Key{C: uint64(i * 7 % 5000), E: uint32(1 + i/5000)}); err != nil {
					return
				}
				mu.Lock()
				put = i + 1
				mu.Unlock()
			}
		}()
		acked := 0
		for {
			mu.Lock()
			n := put
			mu.Unlock()
			if err := m.Commit(); err != nil {
				require.ErrorIs(t, err, blockdevtest.ErrCrashed)
				break
			}
			acked = n // everything put before this Commit began is durable
		}
		<-done
		imgs := pc.Cut()
		m2, err := Open(imgs[0], Options{})
		require.NoError(t, err, "%v", pc)
		require.NoError(t, m2.Check(), "%v", pc)
		got := int(m2.Len())
		require.GreaterOrEqual(t, got, acked, "%v: a returned Commit was lost", pc)
		for i := range got {
			_, ok, err := m2.Get(Key{C: uint64(i * 7 % 5000), E: uint32(1 + i/5000)})
			require.NoError(t, err)
			require.True(t, ok, "%v: key %d of %d missing: not a prefix", pc, i, got)
		}
		t.Logf("round %d: %d keys durable, %d acknowledged, %v", round, got, acked, pc)
	}
}

// TestWriterNeverWaitsForCommitOrWriteBack: while a commit is stuck in its
// flush and the write-back goroutine cannot run, the writer puts keys that
// dirty several times the cache. Every put must return (the writer once
// waited for write-back, which waited for the commit), the writer must
// write back itself so that the open transaction's dirty nodes stay within
// the cache, and afterwards the commit must succeed and every key be
// there.
func TestWriterNeverWaitsForCommitOrWriteBack(t *testing.T) {
	mem, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	g := blockdevtest.NewFlushGate(mem)
	const cache = 1 << 20
	m, err := Format(g, Options{DataChunks: 1 << 17, CacheBytes: cache})
	require.NoError(t, err)
	key := func(i int) Key { return Key{C: uint64(i) * 7919 % (1 << 20), E: 1} }
	const before, n = 1000, 60000
	for i := range before {
		_, err := m.PutData(key(i))
		require.NoError(t, err)
	}
	g.Arm()
	committed := make(chan error, 1)
	go func() { committed <- m.Commit() }()
	<-g.Entered() // the commit is in its first flush, past its write-back barrier
	m.wbMu.Lock() // and the write-back goroutine stops at its next page (it counts each under wbMu)
	written := m.CacheStats().WrittenBack
	worst := 0
	for i := before; i < n; i++ {
		_, err := m.PutData(key(i))
		require.NoError(t, err)
		m.mu.Lock()
		worst = max(worst, m.openDirty())
		m.mu.Unlock()
	}
	t.Logf("open transaction's dirty bytes at most %d (cache %d); the writer wrote back %d nodes", worst, cache, m.CacheStats().WrittenBack-written)
	require.Greater(t, m.CacheStats().WrittenBack, written, "the writer wrote nothing back itself")
	require.LessOrEqual(t, worst, cache, "the open transaction's dirty nodes outgrew the cache")
	m.wbMu.Unlock()
	g.Release()
	require.NoError(t, <-committed)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	require.Equal(t, uint64(n), m.Len())
	for i := range n {
		_, ok, err := m.Get(key(i))
		require.NoError(t, err)
		require.True(t, ok, "key %d", i)
	}
	require.NoError(t, m.Close())
}

// TestLookupsConcurrentWithWriter: goroutines look keys up in the open
// transaction (Get, Seek, Prev: the layer's lock shared, several at once)
// while the writer puts and deletes keys between them, commits, and writes
// back, with a cache of a few nodes so that the lookups load and evict
// nodes all the time. Stable keys sit at even chunks and never change; the
// writer's keys sit at the odd chunks between them, in the same leaves, so
// leaves split and join around the stable keys. Every lookup must see the
// stable keys exactly. Run it with -race.
func TestLookupsConcurrentWithWriter(t *testing.T) {
	seed := blockdevtest.Seed(t)
	dev, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: 16 << 10})
	require.NoError(t, err)
	const chunks = 3000 // stable keys at even chunks, the writer's at odd ones
	stable := make(map[uint64]uint64)
	for c := uint64(0); c < chunks; c += 2 {
		loc, err := m.PutData(Key{C: c, E: 1})
		require.NoError(t, err)
		stable[c] = loc
	}
	require.NoError(t, m.Commit())
	rounds := 12
	if testing.Short() {
		rounds = 6
	}
	stop := runReaders(t, 3, seed, 20, func(rr *rand.Rand) error {
		return checkStableLookup(m, stable, rr.Uint64N(chunks/2)*2)
	})
	rng := rand.New(rand.NewPCG(seed, 7))
	live := make(map[Key]bool)
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
	require.Greater(t, m.CacheStats().Evicted, uint64(0), "the cache never evicted: the test did not exercise eviction")
	require.NoError(t, m.Check())
	require.Equal(t, uint64(len(stable)+len(live)), m.Len())
	require.NoError(t, m.Close())
}

// checkStableLookup looks up the stable key at even chunk c three ways
// and checks the answers against what no change of the writer's can
// alter.
func checkStableLookup(m *Meta, stable map[uint64]uint64, c uint64) error {
	want := Key{C: c, E: 1}
	loc, ok, err := m.Get(want)
	if err != nil {
		return err
	}
	if !ok || loc != stable[c] {
		return fmt.Errorf("Get %v: %d %v, want %d", want, loc, ok, stable[c])
	}
	got, loc, ok, err := m.Seek(Key{C: c})
	if err != nil {
		return err
	}
	if !ok || got != want || loc != stable[c] {
		return fmt.Errorf("Seek %v: %v %d %v, want %v %d", Key{C: c}, got, loc, ok, want, stable[c])
	}
	if c == 0 {
		return nil
	}
	// The key before a stable key: a writer's key at c-1, or the stable
	// key at c-2.
	got, loc, ok, err = m.Prev(want)
	if err != nil {
		return err
	}
	switch {
	case !ok:
		return fmt.Errorf("Prev %v: nothing", want)
	case got.C == c-2 && (got.E != 1 || loc != stable[c-2]):
		return fmt.Errorf("Prev %v: %v %d, want %d", want, got, loc, stable[c-2])
	case got.C != c-2 && got.C != c-1:
		return fmt.Errorf("Prev %v: %v", want, got)
	}
	return nil
}
