package clone

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestErrorSweep fails the k-th call to the source, the destination or the
// metadata device, for every k until a run completes with no fault. Every
// call returns an error or succeeds; the clone then reopens (faults
// cleared) consistent: Check passes, and every sector holds its value as of
// the last successful Flush or a value written since.
func TestErrorSweep(t *testing.T) {
	for _, target := range []string{"source", "destination", "metadata"} {
		t.Run(target, func(t *testing.T) {
			blockdevtest.CheckLeaks(t)
			seed := blockdevtest.Seed(t)
			for k := 1; ; k++ {
				if done := sweepRun(t, target, k, seed); done {
					t.Logf("%s: swept %d fault points", target, k-1)
					return
				}
				require.Less(t, k, 5000, "sweep does not end")
			}
		})
	}
}

// sweepRun runs the workload with the k-th call to target failing; it
// returns true when no fault was injected (the sweep is over).
func sweepRun(t *testing.T, target string, k int, seed uint64) bool {
	const size = 256 << 10
	srcMem, img := newSource(t, size, 4096)
	dstMem := blockdevtest.NewMem(t, size, 4096)
	metaMem := blockdevtest.NewMem(t, MetadataSize(size, 8<<10), 4096)
	src := blockdevtest.NewNamedFaulty(srcMem, "source")
	dst := blockdevtest.NewNamedFaulty(dstMem, "destination")
	meta := blockdevtest.NewNamedFaulty(metaMem, "metadata")
	f := map[string]*blockdevtest.Faulty{"source": src, "destination": dst, "metadata": meta}[target]
	f.Inject(blockdevtest.Fail(blockdevtest.Nth(blockdevtest.OpAny, k), blockdev.ErrIO))
	what := fmt.Sprintf("seed %d, %v", seed, f)
	opts := Options{RegionSize: 8 << 10, NoHydration: true, CommitInterval: -1}
	c, err := Create(src, dst, meta, opts)
	if err != nil {
		require.ErrorIs(t, err, blockdev.ErrIO, what)
		return false
	}
	model := blockdevtest.NewSectorModel()
	model.Add("clone", img)
	rng := rand.New(rand.NewPCG(seed, 3))
	for range 80 {
		sweepOp(t, rng, c, model, what)
	}
	_ = c.Close()
	injected := f.Injected()
	f.Clear()
	c, err = Open(src, dst, meta, opts)
	require.NoError(t, err, what)
	defer c.Close()
	require.NoError(t, c.Check(), what)
	got := make([]byte, size)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err, what)
	require.NoError(t, model.CheckCrash("clone", got, blockdevtest.Drop), what)
	return injected == 0
}

func sweepOp(t *testing.T, rng *rand.Rand, c *Clone, m *blockdevtest.SectorModel, what string) {
	size, bs := c.Size(), int64(c.BlockSize())
	off := rng.Int64N(size/bs) * bs
	n := min(bs*(1+rng.Int64N(3*c.RegionSize()/bs)), size-off)
	check := func(err error) {
		if err != nil {
			require.ErrorIs(t, err, blockdev.ErrIO, what)
		}
	}
	// After a failed write or discard the range holds any mix of old and
	// new blocks: learn which from a read (the single fault has passed).
	learn := func(err error) {
		if err == nil {
			return
		}
		p := make([]byte, n)
		_, rerr := c.ReadAt(p, off)
		require.NoError(t, rerr, what)
		require.NoError(t, m.Observe("clone", off, p), "%s: after a failed write at %d+%d", what, off, n)
	}
	switch op := rng.IntN(10); {
	case op < 3:
		p := make([]byte, n)
		fillPattern(p, off, byte(rng.Uint32()))
		_, err := c.WriteAt(p, off)
		check(err)
		if err != nil {
			m.Failed("clone", off, n, p)
		} else {
			m.Write("clone", off, p)
		}
		learn(err)
	case op < 4:
		err := c.Discard(off, n)
		check(err)
		if err != nil {
			m.Failed("clone", off, n, nil)
		} else {
			m.Discard("clone", off, n)
		}
		learn(err)
	case op < 6:
		p := make([]byte, n)
		_, err := c.ReadAt(p, off)
		check(err)
		if err == nil {
			require.NoError(t, m.CheckRead("clone", off, p), "%s: read %d+%d", what, off, n)
		}
	case op < 8:
		err := c.Flush()
		check(err)
		if err == nil {
			m.Flush("clone")
		}
	default:
		_, err := c.hyd.step(context.Background(), uint64(1+rng.IntN(3)))
		check(err)
	}
}

// TestSourceErrorBackoff: with a dead source, background hydration reports
// the error through Status and the progress callback and retries with
// exponential backoff; every failed attempt is followed by a backoff wait
// (no busy loop).
func TestSourceErrorBackoff(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	srcMem, _ := newSource(t, 1<<20, 4096)
	src := blockdevtest.NewFaulty(srcMem)
	src.FailFrom(blockdevtest.OpRead, 1, blockdev.ErrIO)

	var mu sync.Mutex
	var waits []time.Duration
	var reports []Status
	enough := make(chan struct{})
	const want = 12
	opts := Options{
		BatchSize: 4, HydrationThreshold: 4, // one copy in flight
		RetryMin: 10 * time.Millisecond, RetryMax: 160 * time.Millisecond,
		Progress: func(s Status) {
			mu.Lock()
			reports = append(reports, s)
			mu.Unlock()
		},
		ProgressInterval: time.Nanosecond,
	}
	opts.testAfter = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		waits = append(waits, d)
		if len(waits) == want {
			close(enough)
		}
		mu.Unlock()
		ch := make(chan time.Time, 1)
		ch <- time.Now() // the wait is recorded, not slept
		return ch
	}
	c, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), opts)
	require.NoError(t, err)
	<-enough
	st := c.Status()
	require.NoError(t, c.Close())

	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, Retrying, st.State)
	require.ErrorIs(t, st.LastError, blockdev.ErrIO)
	require.Positive(t, st.Errors)
	for i, d := range waits[:want] {
		require.Equal(t, min(opts.RetryMin<<i, opts.RetryMax), d, "backoff %d", i)
	}
	// One copy in flight: each read attempt is followed by a wait.
	require.LessOrEqual(t, src.Calls(), len(waits)+1, "source reads without backoff")
	var sawErr bool
	for _, s := range reports {
		sawErr = sawErr || (s.State == Retrying && errors.Is(s.LastError, blockdev.ErrIO))
	}
	require.True(t, sawErr, "the progress callback never reported the source error")
	require.Zero(t, st.Hydrated)
}

// TestSourceErrorRecovers: a source that fails for a while and then works
// again is hydrated completely.
func TestSourceErrorRecovers(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	srcMem, img := newSource(t, 1<<20, 4096)
	src := blockdevtest.NewFaulty(srcMem)
	var n int
	var mu sync.Mutex
	src.FailWhen(func(blockdevtest.Call) error {
		mu.Lock()
		defer mu.Unlock()
		if n++; n <= 5 {
			return errTest
		}
		return nil
	})
	dst := blockdevtest.NewMem(t, 1<<20, 4096)
	c, err := Create(src, dst, blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{RetryMin: time.Millisecond, RetryMax: 4 * time.Millisecond})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	st := c.Status()
	require.Equal(t, Hydrated, st.State)
	require.Positive(t, st.Errors)
	require.ErrorIs(t, st.LastError, errTest)
	require.NoError(t, c.Close())
	got := make([]byte, 1<<20)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, img, got)
}
