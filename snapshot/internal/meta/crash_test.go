package meta

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// crashRun runs a seeded workload on m until it ends or a call fails, and
// returns the last committed model and the one a commit in flight would
// leave (equal when nothing was in flight).
func crashRun(t *testing.T, m *Meta, seed uint64, steps int, space keySpace) (committed, inflight *model) {
	rng := rand.New(rand.NewPCG(seed, 2))
	md := newModel()
	committed = md.clone()
	for i := 0; i < steps; i++ {
		if rng.IntN(40) == 0 {
			inflight = md.clone()
			if err := m.Commit(); err != nil {
				require.ErrorIs(t, err, blockdevtest.ErrCrashed)
				return committed, inflight
			}
			committed = inflight
			continue
		}
		if err := crashStep(rng, m, md, space); err != nil {
			require.ErrorIs(t, err, blockdevtest.ErrCrashed)
			return committed, committed
		}
	}
	inflight = md.clone()
	if err := m.Commit(); err != nil {
		require.ErrorIs(t, err, blockdevtest.ErrCrashed)
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
				loc, err := uint64(0), ErrInvalid
				if space.spread > 0 && rng.IntN(2) == 0 {
					loc = rng.Uint64N(space.spread)
					err = m.MarkData(loc) // ErrInvalid: in use or held
				}
				if errors.Is(err, ErrInvalid) {
					loc, err = m.AllocData()
				}
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

// TestCrashEveryCall cuts the power at every write and at every flush of a
// workload (commits, and the write-back of a cache far smaller than the
// tree), cycling the crash policies, and checks that the reopened metadata
// equals the last commit or the one in flight, passes Check, and takes
// more changes. BLOCKSNAP_TORTURE_SECONDS runs more seeds and a longer
// workload.
func TestCrashEveryCall(t *testing.T) {
	crashEveryCall(t, Options{DataChunks: 4096}, keySpace{branches: 2, chunks: 600, epochs: 4})
}

// TestCrashEveryCallPagedMap is TestCrashEveryCall with a data map of
// four pages kept to one page of memory, its chunks taken all over it:
// bitmap pages are paged out and read back all the time, between the
// commits and during them, and changed ones are written out to pages of
// the open transaction (power cuts at those writes too).
func TestCrashEveryCallPagedMap(t *testing.T) {
	crashEveryCall(t, Options{DataChunks: 4 * bitsPerPage, MapBytes: 1},
		keySpace{branches: 2, chunks: 600, epochs: 4, spread: 4 * bitsPerPage})
}

func crashEveryCall(t *testing.T, opts Options, space keySpace) {
	seed := blockdevtest.Seed(t)
	budget := blockdevtest.TortureBudget(t, 600)
	const pages, cache = 512, 2 << 10 // a cache of a few nodes: write-back and eviction all the time
	opts.CacheBytes, opts.SyncWriteBack = cache, true
	steps := 100
	if budget.Timed() {
		steps = 400
	}
	// run formats a region behind a power cut armed for the k-th call of
	// kind op after Format (k 0: never), runs the workload, and returns
	// the cut and the models.
	var last *Meta
	run := func(s uint64, op blockdevtest.Op, k int, pol blockdevtest.Policy) (*blockdevtest.PowerCut, *model, *model) {
		pc := blockdevtest.NewPowerCut(op, 0, pol)
		dev := pc.NewDevice(t, "meta", pages*PageSize, 4096)
		m, err := Format(dev, opts)
		require.NoError(t, err)
		if k > 0 {
			pc.Arm(op, k)
		}
		committed, inflight := crashRun(t, m, s, steps, space)
		last = m
		return pc, committed, inflight
	}
	for round := uint64(0); ; round++ {
		s := seed + round
		dry, _, _ := run(s, blockdevtest.OpAny, 0, blockdevtest.Policy{})
		if round == 0 {
			sp := last.Space()
			t.Logf("one round: %d writes, %d flushes; %d bitmap pages read back, %d written out", dry.Calls(blockdevtest.OpWrite), dry.Calls(blockdevtest.OpFlush), sp.MapReads, sp.MapWrites)
			if opts.MapBytes > 0 {
				require.Positive(t, sp.MapReads, "no bitmap page was read back")
				require.Positive(t, sp.MapWrites, "no dirty bitmap page was written out")
			}
		}
		// flushes first: they are few, and each ends a commit's phase
		for _, op := range []blockdevtest.Op{blockdevtest.OpFlush, blockdevtest.OpWrite} {
			total := dry.Calls(op)
			for k := 1; k <= total; k++ {
				if !budget.Next() {
					return
				}
				pol := blockdevtest.AllPolicies(s + uint64(k))[k%4]
				pc, committed, inflight := run(s, op, k, pol)
				imgs := pc.Cut()
				reopen := opts
				reopen.DataChunks = 0
				m2, err := Open(imgs[0], reopen)
				require.NoError(t, err, "seed %d, %v", s, pc)
				require.NoError(t, m2.Check(), "seed %d, %v", s, pc)
				want := committed
				if !sameKeys(m2, committed) {
					want = inflight
				}
				verifyAll(t, m2, want)
				rng := rand.New(rand.NewPCG(s, uint64(k)))
				for range 20 {
					require.NoError(t, crashStep(rng, m2, want, space))
				}
				require.NoError(t, m2.Commit())
				require.NoError(t, m2.Check())
			}
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
