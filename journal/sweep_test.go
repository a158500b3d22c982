package journal

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestErrorSweep fails the k-th device call, for every k, of a workload
// that formats, appends, commits, checkpoints, closes, reopens and goes on,
// until a run sees no fault. Every call must return (an error or success;
// no panic, no hang), and after a power cut the journal must reopen
// satisfying the crash contract against the model.
func TestErrorSweep(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			policies := blockdevtest.AllPolicies(uint64(bs))
			for k := 1; ; k++ {
				sim := blockdevtest.MustCrashSim(2*int64(bs)+2*(8<<10)+(64<<10)*int64(1+bs/4096), bs)
				f := blockdevtest.NewFaulty(sim)
				f.FailNth(blockdevtest.OpAny, k, blockdev.ErrIO)
				m := newModel()
				formatted, err := sweepWorkload(f, m, uint64(k))
				require.NoError(t, err, "k=%d", k)
				injected := f.Injected()
				policy := policies[k%len(policies)]
				next := sim.MustCrash(policy)
				if formatted {
					c := &checker{}
					j, err := Open(next, Options{}, c)
					require.NoError(t, err, "k=%d %v", k, policy)
					require.NoError(t, m.verify(c), "k=%d %v", k, policy)
					require.NoError(t, j.Close())
				}
				if injected == 0 {
					t.Logf("clean run after %d faulted runs", k-1)
					require.Greater(t, k, 50, "the workload makes many device calls")
					require.True(t, m.ckOK, "the workload checkpoints")
					return
				}
			}
		})
	}
}

// sweepOptions make the workload checkpoint several times.
var sweepOptions = Options{CheckpointSize: 8 << 10, CheckpointAt: 0.15}

// sweepWorkload drives a journal on dev single-handed. It returns whether
// Format succeeded, and an error only for a broken promise (an injected
// fault may make any call fail; it must fail cleanly).
func sweepWorkload(dev blockdev.Device, m *model, seed uint64) (bool, error) {
	j, err := Format(dev, sweepOptions)
	if err != nil {
		return false, nil
	}
	rng := rand.New(rand.NewPCG(seed, 3))
	if err := sweepOps(j, m, rng, "a", 40); err != nil {
		return true, err
	}
	if err := j.Close(); err != nil {
		return true, fmt.Errorf("close: %w", err)
	}
	c := &checker{}
	j, err = Open(dev, sweepOptions, c)
	if err != nil {
		return true, nil // a fault during recovery: nothing more to do
	}
	if err := m.verify(c); err != nil {
		return true, fmt.Errorf("reopen without a crash: %w", err)
	}
	if err := sweepOps(j, m, rng, "b", 20); err != nil {
		return true, err
	}
	return true, j.Close()
}

// sweepOps appends n records, committing most and checkpointing when asked.
// Append never blocks: its context is already cancelled, so a full log
// returns at once.
func sweepOps(j *Journal, m *model, rng *rand.Rand, tag string, n int) error {
	ctx := context.Background()
	noWait, cancel := context.WithCancel(ctx)
	cancel()
	for i := range n {
		select {
		case <-j.NeedCheckpoint():
			upTo := j.LastSeq()
			if err := j.Checkpoint(ctx, upTo, m.captureFor(upTo)); err == nil {
				m.checkpointReturned(upTo)
			}
		default:
		}
		p := testPayload(rng, fmt.Sprintf("%s%d;", tag, i))
		seq, err := j.Append(noWait, p)
		if err == nil {
			m.appended(seq, p)
		} else if !errors.Is(err, blockdev.ErrIO) && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("append: unexpected error %w", err)
		}
		if rng.IntN(4) == 0 {
			continue
		}
		upTo := j.LastSeq()
		if err := j.Commit(ctx); err == nil {
			m.commitReturned(upTo)
		} else if !errors.Is(err, blockdev.ErrIO) {
			return fmt.Errorf("commit: unexpected error %w", err)
		}
	}
	return nil
}
