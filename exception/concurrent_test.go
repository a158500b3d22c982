package exception

import (
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestRaceSnapshotsUnderLoad runs many origin writers and snapshot readers
// while snapshots are created, deleted, merged and run out of COW space,
// with a small COW throttle. It must finish before its deadline (no
// deadlock) and be clean under -race.
func TestRaceSnapshotsUnderLoad(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	seed := blockdevtest.Seed(t)
	const size = 1 << 20
	o, err := NewOrigin(blockdevtest.NewMem(t, size, 512), OriginOptions{MaxCOWs: 3})
	require.NoError(t, err)

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			p := make([]byte, 16*512)
			for !stop.Load() {
				n := (1 + rng.IntN(16)) * 512
				off := rng.Int64N(size/512-16) * 512
				var err error
				switch rng.IntN(10) {
				case 0:
					err = o.Flush()
				case 1:
					err = o.Discard(off, int64(n))
				default:
					_, err = o.WriteAt(p[:n], off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 100+uint64(r)))
			p := make([]byte, 8192)
			for !stop.Load() {
				snaps := o.Snapshots()
				if len(snaps) == 0 {
					runtime.Gosched()
					continue
				}
				s := snaps[rng.IntN(len(snaps))]
				off := rng.Int64N(size/8192) * 8192
				var err error
				if rng.IntN(3) == 0 {
					_, err = s.WriteAt(p, off)
				} else {
					_, err = s.ReadAt(p, off)
				}
				if err != nil && !errors.Is(err, ErrInvalidSnapshot) && !errors.Is(err, blockdev.ErrClosed) &&
					!errors.Is(err, ErrMerging) && !errors.Is(err, ErrOverflow) {
					errs <- err
					return
				}
			}
		}()
	}

	rng := rand.New(rand.NewPCG(seed, 999))
	full := 0 // snapshots seen invalid or overflowed
	for round := 0; round < 60 && ctx.Err() == nil; round++ {
		snaps := o.Snapshots()
		switch op := rng.IntN(6); {
		case op < 3 || len(snaps) == 0:
			cow := blockdevtest.NewMem(t, int64(64<<10+rng.IntN(4)*128<<10), 512)
			_, err := o.CreateSnapshot(cow, Options{ChunkSize: 4096, Persistent: rng.IntN(2) == 0, Overflow: rng.IntN(2) == 0})
			if err != nil && !errors.Is(err, ErrMerging) {
				require.NoError(t, err)
			}
		case op < 5:
			s := snaps[rng.IntN(len(snaps))]
			if st := s.State(); st == StateInvalid || st == StateOverflow {
				full++
			}
			err := s.Delete()
			if err != nil && !errors.Is(err, ErrMerging) && !errors.Is(err, blockdev.ErrClosed) {
				require.NoError(t, err)
			}
		default:
			err := snaps[rng.IntN(len(snaps))].Merge(ctx, nil)
			if err != nil && !errors.Is(err, ErrInvalidSnapshot) && !errors.Is(err, ErrMerging) && !errors.Is(err, blockdev.ErrClosed) {
				require.NoError(t, err)
			}
		}
	}
	stop.Store(true)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		buf := make([]byte, 1<<20)
		t.Fatalf("deadlock (seed %d):\n%s", seed, buf[:runtime.Stack(buf, true)])
	}
	require.NoError(t, ctx.Err(), "the run did not finish before its deadline (seed %d)", seed)
	for _, s := range o.Snapshots() {
		if st := s.State(); st == StateInvalid || st == StateOverflow {
			full++
		}
	}
	require.Positive(t, full, "no snapshot ran out of COW space (seed %d)", seed)
	t.Logf("%d snapshots ran out of COW space", full)
	close(errs)
	for err := range errs {
		t.Fatalf("seed %d: %v", seed, err)
	}
	for _, s := range o.Snapshots() {
		if s.State() == StateValid || s.State() == StateOverflow {
			rep, err := s.Check()
			require.NoError(t, err)
			require.Zero(t, rep.Leaked)
			require.Zero(t, rep.InFlight)
		}
	}
	require.NoError(t, o.Close())
}
