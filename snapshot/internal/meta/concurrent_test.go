package meta

import (
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

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
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rr := rand.New(rand.NewPCG(seed, uint64(10+g)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				v := m.View()
				mu.Lock()
				md := models[v.Tx()]
				mu.Unlock()
				if md == nil { // committed, model not recorded yet
					v.Release()
					continue
				}
				for range 20 {
					q := w.space.random(rr)
					got, loc, ok, err := v.Seek(q)
					if err != nil {
						errs <- err
						v.Release()
						return
					}
					want, wok := md.seek(q)
					if ok != wok || ok && (got != want || loc != md.locs[want]) {
						errs <- errMismatch
						v.Release()
						return
					}
				}
				v.Release()
			}
		}()
	}
	for range rounds {
		for range 100 {
			w.step()
		}
		require.NoError(t, m.Commit())
		mu.Lock()
		models[committedTx(m)] = w.md.clone()
		mu.Unlock()
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.NoError(t, m.Check())
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
