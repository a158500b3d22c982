package meta

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// cutDev cuts the power at its at-th write or flush: that call and every
// later write or flush fail, as if the machine stopped there.
type cutDev struct {
	blockdev.Device
	calls atomic.Int64
	at    int64 // 0: never
	cut   atomic.Bool
}

var errPowerCut = fmt.Errorf("power cut: %w", blockdev.ErrIO)

func (d *cutDev) tick() error {
	n := d.calls.Add(1)
	if d.cut.Load() || d.at > 0 && n >= d.at {
		d.cut.Store(true)
		return errPowerCut
	}
	return nil
}

func (d *cutDev) WriteAt(p []byte, off int64) (int, error) {
	if err := d.tick(); err != nil {
		return 0, err
	}
	return d.Device.WriteAt(p, off)
}

func (d *cutDev) Flush() error {
	if err := d.tick(); err != nil {
		return err
	}
	return d.Device.Flush()
}

// crashRun runs a seeded workload on m until it ends or a call fails, and
// returns the last committed model and the one a commit in flight would
// leave (equal when nothing was in flight).
func crashRun(t *testing.T, m *Meta, seed uint64, steps int) (committed, inflight *model) {
	rng := rand.New(rand.NewPCG(seed, 2))
	md := newModel()
	committed = md.clone()
	space := keySpace{branches: 2, chunks: 600, epochs: 4}
	for i := 0; i < steps; i++ {
		if rng.IntN(40) == 0 {
			inflight = md.clone()
			if err := m.Commit(); err != nil {
				require.ErrorIs(t, err, errPowerCut)
				return committed, inflight
			}
			committed = inflight
			continue
		}
		if err := crashStep(rng, m, md, space); err != nil {
			require.ErrorIs(t, err, errPowerCut)
			return committed, committed
		}
	}
	inflight = md.clone()
	if err := m.Commit(); err != nil {
		require.ErrorIs(t, err, errPowerCut)
		return committed, inflight
	}
	return inflight, inflight
}

// crashStep is one random change; the model changes only if it succeeded.
func crashStep(rng *rand.Rand, m *Meta, md *model, space keySpace) error {
	if rng.IntN(3) > 0 || len(md.keys) == 0 {
		k := space.random(rng)
		n := 1 + rng.IntN(8)
		for i := 0; i < n && k.C < space.chunks; i++ {
			if _, ok := md.locs[k]; !ok {
				loc, err := m.AllocData()
				if err != nil {
					return err
				}
				if err := m.Put(k, loc); err != nil {
					return err
				}
				md.put(k, loc)
			}
			k.C++
		}
		return nil
	}
	k := md.keys[rng.IntN(len(md.keys))]
	loc, err := m.Delete(k)
	if err != nil {
		return err
	}
	md.del(k)
	return m.FreeData(loc)
}

// tortureBudget is BLOCKSNAP_TORTURE_SECONDS, or 0.
func tortureBudget() time.Duration {
	s, _ := strconv.Atoi(os.Getenv("BLOCKSNAP_TORTURE_SECONDS"))
	return time.Duration(s) * time.Second
}

// TestCrashEveryCall cuts the power at every write and flush of a workload
// (commits and the write-back of a cache far smaller than the tree), under
// each crash policy in turn, and checks that the reopened metadata equals
// the last commit or the one in flight, and passes Check.
func TestCrashEveryCall(t *testing.T) {
	seed := testSeed(t)
	const pages, cache = 512, 16 << 10
	steps := 100
	if tortureBudget() > 0 {
		steps = 400
	}
	deadline := time.Now().Add(tortureBudget())
	for round := uint64(0); ; round++ {
		s := seed + round
		// a dry run counts the calls
		sim := blockdevtest.MustCrashSim(pages*PageSize, 4096)
		m, err := Format(sim, Options{DataChunks: 4096, CacheBytes: cache})
		require.NoError(t, err)
		cd := &cutDev{Device: sim}
		m.dev = cd
		crashRun(t, m, s, steps)
		total := cd.calls.Load()
		for at := int64(1); at <= total; at++ {
			sim := blockdevtest.MustCrashSim(pages*PageSize, 4096)
			m, err := Format(sim, Options{DataChunks: 4096, CacheBytes: cache})
			require.NoError(t, err)
			cd := &cutDev{Device: sim, at: at}
			m.dev = cd
			committed, inflight := crashRun(t, m, s, steps)
			pol := blockdevtest.AllPolicies(s + uint64(at))[at%4]
			img := sim.MustCrash(pol)
			m2, err := Open(img, Options{CacheBytes: cache})
			require.NoError(t, err, "seed %d, cut at call %d of %d, %v", s, at, total, pol)
			require.NoError(t, m2.Check(), "seed %d, cut at call %d, %v", s, at, pol)
			want := committed
			if m2.Len() != uint64(len(committed.keys)) || !sameKeys(m2, committed) {
				want = inflight
			}
			verifyAll(t, m2, want)
			// the reopened metadata keeps working
			rng := rand.New(rand.NewPCG(s, uint64(at)))
			for range 20 {
				require.NoError(t, crashStep(rng, m2, want, keySpace{branches: 2, chunks: 600, epochs: 4}))
			}
			require.NoError(t, m2.Commit())
			require.NoError(t, m2.Check())
		}
		t.Logf("round %d: %d crash points", round, total)
		if time.Now().After(deadline) {
			return
		}
	}
}

func sameKeys(m *Meta, md *model) bool {
	same := true
	i := 0
	_ = m.Ascend(Key{}, func(k Key, loc uint64) bool {
		if i >= len(md.keys) || md.keys[i] != k || md.locs[k] != loc {
			same = false
			return false
		}
		i++
		return true
	})
	return same && i == len(md.keys)
}
