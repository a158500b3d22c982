package journal

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// tortureStats shows what the torture runs exercised.
var tortureStats counters

type counters struct {
	midRun, checkpoints, loaded, replayed, laps atomic.Int64
}

func (s *counters) noteRecovery(c *checker) {
	if c.loaded {
		s.loaded.Add(1)
	}
	s.replayed.Add(int64(len(c.seqs)))
}

// crashRoundsPerRun is how many crash points each torture run visits, one
// after the other on the same journal.
const crashRoundsPerRun = 3

// TestCrashTorture runs concurrent committers and a checkpointer against a
// journal on a CrashSim, cuts the power at a random device call, reopens and
// checks the crash contract against a model: every record whose Commit
// returned is replayed exactly once and in order, nothing never appended
// appears, and the checkpoint is wholly the last completed one or wholly the
// one in flight. Every crash policy is used; each run crashes the same
// journal several times (so recoveries of recoveries are checked too).
func TestCrashTorture(t *testing.T) {
	base := blockdevtest.Seed(t)
	budget := blockdevtest.TortureBudget(t, 3334*crashRoundsPerRun)
	for i := uint64(0); budget.NextN(crashRoundsPerRun); i++ {
		// Run i replays first with BLOCKSNAP_SEED=base+i.
		seed := base + i
		if err := tortureRun(seed); err != nil {
			t.Fatalf("crash torture run %d (seed %d; %s): %v", i, seed, blockdevtest.ReplayCommand(t, seed), err)
		}
	}
	t.Logf("%d mid-workload, %d checkpoints completed, %d recoveries loaded one, %d records replayed, log lapped %d times",
		tortureStats.midRun.Load(), tortureStats.checkpoints.Load(), tortureStats.loaded.Load(),
		tortureStats.replayed.Load(), tortureStats.laps.Load())
}

func tortureRun(seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, 0x70))
	bs := 512
	logSize := int64(16 << 10)
	if seed%2 == 1 {
		bs, logSize = 4096, 64<<10
	}
	const slot = 8 << 10
	sim, err := blockdevtest.NewCrashSim(2*int64(bs)+2*slot+logSize, bs)
	if err != nil {
		return err
	}
	m := newModel()
	policies := blockdevtest.AllPolicies(seed)
	lastCut := "no power cut yet"
	for round := range crashRoundsPerRun {
		policy := policies[(seed+uint64(round))%uint64(len(policies))]
		pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, policy) // armed once open
		f := pc.Device("journal", sim)
		var j *Journal
		if round == 0 {
			j, err = Format(f, Options{CheckpointSize: slot})
		} else {
			c := &checker{}
			j, err = Open(f, Options{}, c)
			if err == nil {
				err = m.verify(c)
				tortureStats.noteRecovery(c)
			}
		}
		if err != nil {
			return fmt.Errorf("round %d, after the %v: open: %w", round, lastCut, err)
		}
		if seed%4 >= 2 {
			// Many batches per commit round: a crash can then tear one
			// batch and keep the next.
			j.batchTarget = 300
		}
		pc.Arm(blockdevtest.OpAny, 1+rng.IntN(250))
		sim = crashDuring(j, pc, m, seed, round)
		lastCut = pc.String()
	}
	c := &checker{}
	j, err := Open(sim, Options{}, c)
	if err != nil {
		return fmt.Errorf("final open, after the %v: %w", lastCut, err)
	}
	if err := m.verify(c); err != nil {
		return fmt.Errorf("final recovery, after the %v: %w", lastCut, err)
	}
	tortureStats.noteRecovery(c)
	return j.Close()
}

// crashDuring runs the workload on j, whose device is behind pc, until the
// power cut pc is armed for, or the workload's end and a cut then. It
// returns the device the cut left.
func crashDuring(j *Journal, pc *blockdevtest.PowerCut, m *model, seed uint64, round int) *blockdevtest.CrashSim {
	ctx := context.Background()
	const workers, ops = 3, 25
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(round*16+w)))
			for i := range ops {
				p := testPayload(rng, fmt.Sprintf("%d/%d/%d/%d;", seed, round, w, i))
				seq, err := j.Append(ctx, p)
				if err != nil {
					return
				}
				m.appended(seq, p)
				if rng.IntN(3) == 0 {
					continue
				}
				upTo := j.LastSeq()
				if err := j.Commit(ctx); err != nil {
					return
				}
				m.commitReturned(upTo)
			}
		}()
	}
	ckptDone := make(chan struct{})
	go func() {
		defer close(ckptDone)
		for range j.NeedCheckpoint() {
			upTo := j.LastSeq()
			if err := j.Checkpoint(ctx, upTo, m.captureFor(upTo)); err == nil {
				m.checkpointReturned(upTo)
			}
		}
	}()
	workersDone := make(chan struct{})
	go func() {
		wg.Wait()
		close(workersDone)
	}()
	select {
	case <-pc.Done():
		tortureStats.midRun.Add(1)
	case <-workersDone:
	}
	next := pc.Cut()[0]
	st := j.Stats()
	tortureStats.checkpoints.Add(int64(st.Checkpoints))
	tortureStats.laps.Add(int64(st.Bytes) / j.logSize)
	_ = j.Close()
	<-workersDone
	<-ckptDone
	return next
}
