package exception

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestCrashTorture cuts the power at a random device call while writers
// run against an origin with persistent snapshots, under every crash
// policy, then reopens everything and checks the crash model: snapshots
// read exactly what the origin held when they were taken, flushed origin
// writes survive, Check passes and no COW chunk leaks.
func TestCrashTorture(t *testing.T) { eachCrashPoint(t, crashPoints, crashOnce) }

// eachCrashPoint runs crash points of the test's budget: seed+i for the
// i-th round, under each policy in turn.
func eachCrashPoint(t *testing.T, points int, fn func(*testing.T, uint64, blockdevtest.Policy)) {
	seed := blockdevtest.Seed(t)
	budget := blockdevtest.TortureBudget(t, points)
	for i := uint64(0); ; i++ {
		for _, pol := range blockdevtest.AllPolicies(seed + i) {
			if !budget.Next() {
				return
			}
			fn(t, seed+i, pol)
		}
	}
}

// crashPoints is the torture's default count of crash points (a tenth under
// -short).
const crashPoints = 2000

const (
	ctSize    = 256 << 10
	ctWriters = 4
)

// ctWriter owns a region of the origin and keeps its own SectorModel of it
// (one model per writer, each used by one goroutine).
type ctWriter struct {
	base int64
	m    *blockdevtest.SectorModel
}

// ctRegion is the name of a writer's region in its model.
const ctRegion = "region"

func crashOnce(t *testing.T, seed uint64, pol blockdevtest.Policy) {
	rng := rand.New(rand.NewPCG(seed, uint64(pol.Mode)))
	bs := []int{512, 4096}[rng.IntN(2)]
	cs := []int64{4096, 8192}[rng.IntN(2)]
	pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 1+rng.IntN(700), pol)
	originDev := pc.NewDevice(t, "origin", ctSize, bs)
	cows := []blockdev.Device{pc.NewDevice(t, "cow0", 2*ctSize, bs), pc.NewDevice(t, "cow1", 2*ctSize, bs)}
	fail := func(msg string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d, %v, bs %d, chunk %d: "+msg, append([]any{seed, pc, bs, cs}, args...)...)
	}
	o := newOrigin(t, originDev)
	region := int64(ctSize / ctWriters)
	ws := make([]*ctWriter, ctWriters)
	for w := range ws {
		ws[w] = &ctWriter{base: int64(w) * region, m: blockdevtest.NewSectorModel()}
		ws[w].m.Add(ctRegion, make([]byte, region))
	}
	var models [][]byte
	alive := true
	for phase := range 3 {
		if !alive {
			break
		}
		if phase < 2 {
			model := make([]byte, 0, ctSize)
			for _, w := range ws {
				model = append(model, w.m.Current(ctRegion)...)
			}
			if _, err := o.CreateSnapshot(cows[phase], Options{ChunkSize: cs, Persistent: true}); err != nil {
				break
			}
			// Creation flushed the origin: what it held is durable.
			for _, w := range ws {
				w.m.Flush(ctRegion)
			}
			models = append(models, model)
		}
		var wg sync.WaitGroup
		var failed atomic.Bool
		for w := range ws {
			wg.Add(1)
			wrng := rand.New(rand.NewPCG(seed, uint64(phase*16+w)))
			go func() {
				defer wg.Done()
				if !ctWrite(o, ws[w], wrng, bs) {
					failed.Store(true)
				}
			}()
		}
		wg.Wait()
		alive = !failed.Load()
	}
	after := pc.Cut()
	_ = o.Close()

	// Power is back.
	o2 := newOrigin(t, after[0])
	got := blockdevtest.ReadAll(t, o2)
	for i, w := range ws {
		if err := w.m.CheckCrash(ctRegion, got[w.base:w.base+region], pol.Mode); err != nil {
			fail("origin region of writer %d, from byte %d: %v", i, w.base, err)
		}
	}
	for i, model := range models {
		s, err := o2.OpenSnapshot(after[1+i], Options{})
		if err != nil {
			fail("open snapshot %d: %v", i, err)
		}
		if s.State() != StateValid {
			fail("snapshot %d is %v: %v", i, s.State(), s.Status().Err)
		}
		if d := blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s), model); d >= 0 {
			fail("snapshot %d differs at byte %d", i, d)
		}
		rep, err := s.Check()
		if err != nil || rep.Leaked != 0 {
			fail("snapshot %d check: %v, %d leaked", i, err, rep.Leaked)
		}
	}
	// The recovered stores go on working.
	mustWrite(t, o2, blockdevtest.Fill(0x5c, ctSize), 0)
	for i, s := range o2.Snapshots() {
		if d := blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s), models[i]); d >= 0 {
			fail("snapshot %d differs at byte %d after writes following recovery", i, d)
		}
		rep, err := s.Check()
		if err != nil || rep.Leaked != 0 {
			fail("snapshot %d check after recovery writes: %v, %d leaked", i, err, rep.Leaked)
		}
	}
	require.NoError(t, o2.Close())
}

// ctWrite runs one writer's random writes and flushes in its region; it
// reports false once the devices failed.
func ctWrite(o *Origin, w *ctWriter, rng *rand.Rand, bs int) bool {
	blocks := int64(len(w.m.Current(ctRegion)) / bs)
	for range 12 {
		if rng.IntN(6) == 0 {
			if o.Flush() != nil {
				return false
			}
			w.m.Flush(ctRegion)
			continue
		}
		off := rng.Int64N(blocks)
		n := 1 + rng.Int64N(min(8, blocks-off))
		p := make([]byte, n*int64(bs))
		v := byte(rng.Uint32())
		for b := 0; b < len(p); b += bs {
			// Block b holds v+b/bs throughout: memset by doubling copies
			// (a byte loop here was a third of the torture's time).
			blk := p[b : b+bs]
			blk[0] = v + byte(b/bs)
			for j := 1; j < bs; j *= 2 {
				copy(blk[j:], blk[:j])
			}
		}
		if _, err := o.WriteAt(p, w.base+off*int64(bs)); err != nil {
			// Failed, it may still have landed in part.
			w.m.Failed(ctRegion, off*int64(bs), int64(len(p)), p)
			return false
		}
		w.m.Write(ctRegion, off*int64(bs), p)
	}
	return true
}

// TestCrashDuringMerge cuts the power while a snapshot merges back into
// the origin with another snapshot attached, then resumes the merge after
// reopening: the origin ends up as the merged snapshot, the other snapshot
// is unchanged, and Check passes.
func TestCrashDuringMerge(t *testing.T) { eachCrashPoint(t, mergeCrashPoints, crashMergeOnce) }

const mergeCrashPoints = 200

func crashMergeOnce(t *testing.T, seed uint64, pol blockdevtest.Policy) {
	rng := rand.New(rand.NewPCG(seed, 77+uint64(pol.Mode)))
	const size, cs = 128 << 10, 4096
	pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, pol) // armed below, for the merge
	o := newOrigin(t, pc.NewDevice(t, "origin", size, 512))
	cowA, cowB := pc.NewDevice(t, "cowA", 2*size, 512), pc.NewDevice(t, "cowB", 2*size, 512)
	mustWrite(t, o, blockdevtest.Fill(1, size), 0)
	a, err := o.CreateSnapshot(cowA, Options{ChunkSize: cs, Persistent: true})
	require.NoError(t, err)
	for range 20 {
		c := rng.Int64N(size / cs)
		mustWrite(t, o, blockdevtest.Fill(byte(2+rng.IntN(50)), cs), c*cs)
	}
	_, err = o.CreateSnapshot(cowB, Options{ChunkSize: 8192, Persistent: true})
	require.NoError(t, err)
	modelB := blockdevtest.ReadAll(t, o)
	for range 10 {
		c := rng.Int64N(size / cs)
		mustWrite(t, a, blockdevtest.Fill(byte(100+rng.IntN(50)), cs/2), c*cs)
	}
	modelA := blockdevtest.ReadAll(t, a)
	// The model counts A's own writes as durable: flush both volumes (the
	// origin's Flush does not cover a snapshot's COW device).
	require.NoError(t, o.Flush())
	require.NoError(t, a.Flush())

	pc.Arm(blockdevtest.OpAny, 1+rng.IntN(300))
	mergeErr := a.Merge(context.Background(), nil)
	after := pc.Cut()
	_ = o.Close()

	o2 := newOrigin(t, after[0])
	a2, err := o2.OpenSnapshot(after[1], Options{})
	require.NoError(t, err, "seed %d, %v", seed, pc)
	b2, err := o2.OpenSnapshot(after[2], Options{})
	require.NoError(t, err, "seed %d, %v", seed, pc)
	if mergeErr == nil {
		require.Zero(t, a2.Status().Exceptions)
	}
	require.NoError(t, a2.Merge(context.Background(), nil), "seed %d, %v", seed, pc)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o2), modelA), "origin after resumed merge (seed %d, %v)", seed, pc)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, b2), modelB), "other snapshot (seed %d, %v)", seed, pc)
	rep, err := b2.Check()
	require.NoError(t, err)
	require.Zero(t, rep.Leaked)
	require.NoError(t, o2.Close())
}
