package journal

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// tortureBudget returns how many runs to do by default, or, with
// BLOCKSNAP_TORTURE_SECONDS set, a deadline to run until.
func tortureBudget(t *testing.T, runs int) (int, time.Time) {
	if s := os.Getenv("BLOCKSNAP_TORTURE_SECONDS"); s != "" {
		sec, err := strconv.Atoi(s)
		require.NoError(t, err, "BLOCKSNAP_TORTURE_SECONDS")
		return 1 << 62, time.Now().Add(time.Duration(sec) * time.Second)
	}
	if testing.Short() || raceEnabled {
		runs /= 10
	}
	return runs, time.Time{}
}

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
	runs, deadline := tortureBudget(t, 1500)
	base := uint64(time.Now().UnixNano())
	points := 0
	for i := 0; i < runs; i++ {
		if !deadline.IsZero() && time.Now().After(deadline) {
			break
		}
		seed := base + uint64(i)
		if err := tortureRun(seed); err != nil {
			t.Fatalf("crash torture seed %d: %v", seed, err)
		}
		points += crashRoundsPerRun
	}
	t.Logf("%d crash points (base seed %d): %d mid-workload, %d checkpoints completed, %d recoveries loaded one, %d records replayed, log lapped %d times",
		points, base, tortureStats.midRun.Load(), tortureStats.checkpoints.Load(), tortureStats.loaded.Load(),
		tortureStats.replayed.Load(), tortureStats.laps.Load())
}

// TestCrashTortureSeed replays one seed: BLOCKSNAP_JOURNAL_SEED=n.
func TestCrashTortureSeed(t *testing.T) {
	s := os.Getenv("BLOCKSNAP_JOURNAL_SEED")
	if s == "" {
		t.Skip("set BLOCKSNAP_JOURNAL_SEED to replay one crash torture seed")
	}
	seed, err := strconv.ParseUint(s, 10, 64)
	require.NoError(t, err)
	require.NoError(t, tortureRun(seed))
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
	for round := range crashRoundsPerRun {
		f := blockdevtest.NewFaulty(sim)
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
			return fmt.Errorf("round %d: open: %w", round, err)
		}
		if seed%4 >= 2 {
			// Many batches per commit round: a crash can then tear one
			// batch and keep the next.
			j.batchTarget = 300
		}
		policy := policies[(int(seed)+round)%len(policies)]
		crashAt := f.Calls() + 1 + rng.IntN(250)
		next, err := crashDuring(j, f, sim, m, policy, crashAt, seed, round)
		if err != nil {
			return fmt.Errorf("round %d (%v, crash at call %d): %w", round, policy, crashAt, err)
		}
		sim = next
	}
	c := &checker{}
	j, err := Open(sim, Options{}, c)
	if err != nil {
		return fmt.Errorf("final open: %w", err)
	}
	if err := m.verify(c); err != nil {
		return fmt.Errorf("final recovery: %w", err)
	}
	tortureStats.noteRecovery(c)
	return j.Close()
}

// crashDuring runs the workload on j (whose device is f over sim) and cuts
// the power just before device call crashAt, or when the workload ends.
// It returns the device the crash left.
func crashDuring(j *Journal, f *blockdevtest.Faulty, sim *blockdevtest.CrashSim, m *model,
	policy blockdevtest.Policy, crashAt int, seed uint64, round int) (*blockdevtest.CrashSim, error) {
	ctx := context.Background()
	var (
		once     sync.Once
		next     *blockdevtest.CrashSim
		crashErr error
		crashed  = make(chan struct{})
	)
	crash := func() {
		once.Do(func() {
			next, crashErr = sim.Crash(policy)
			close(crashed)
		})
	}
	f.FailWhen(func(c blockdevtest.Call) error {
		if c.Total >= crashAt {
			crash()
		}
		return nil
	})

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
	case <-crashed:
		tortureStats.midRun.Add(1)
	case <-workersDone:
	}
	crash()
	st := j.Stats()
	tortureStats.checkpoints.Add(int64(st.Checkpoints))
	tortureStats.laps.Add(int64(st.Bytes) / j.logSize)
	_ = j.Close()
	<-workersDone
	<-ckptDone
	return next, crashErr
}
