package snapshot

import (
	"bytes"
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

// TestRollbackSizesRacingIO: rollbacks of a volume to snapshots smaller
// and larger than it (the size first or last, and the chunks past a
// smaller end made to inherit again), each followed by a grow back,
// race a writer and a reader of the volume, the background committer
// (1 ms), explicit Checkpoints and a small metadata cache. I/O past the
// volume's size of the moment fails with ErrOutOfRange and nothing else;
// every snapshot keeps its contents; Check passes; and once the racing
// ends, a rollback to each snapshot reads exactly it, its size included,
// and a grow after it reads zeros past the snapshot's end. Run with
// -race.
func TestRollbackSizesRacingIO(t *testing.T) {
	seed := blockdevtest.Seed(t)
	ctx := context.Background()
	const cs, big = 4 << 10, 48 * (4 << 10)
	opts := Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: time.Millisecond, MetadataCache: 64 << 10}
	s, err := Format(nil, blockdevtest.MustCrashSim(32<<20, 512), opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	v, err := s.CreateVolume("v", big)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(seed, 9))
	fill := func(p []byte) {
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
	}
	// Snapshots of several sizes, each a shrink of the written volume
	// (so that a parent holds data past a snapshot's end) and a grow back.
	snaps := map[string][]byte{}
	for i := range 6 {
		p := make([]byte, big)
		fill(p)
		_, err := v.WriteAt(p, 0)
		require.NoError(t, err)
		size := (1 + rng.Int64N(big/512-1)) * 512
		require.NoError(t, s.Resize("v", size, ResizeOptions{Shrink: true}))
		name := fmt.Sprintf("s%d", i)
		_, err = s.CreateSnapshot(name, v)
		require.NoError(t, err)
		snaps[name] = bytes.Clone(p[:size])
		require.NoError(t, s.Resize("v", big, ResizeOptions{}))
	}
	names := []string{"s0", "s1", "s2", "s3", "s4", "s5"}

	rounds := shortScale(40)
	var stop sync.Once
	done := make(chan struct{})
	g := newRaceGroup(seed, func() { stop.Do(func() { close(done) }) })
	outOfRangeOK := func(err error) error {
		if err == nil || errors.Is(err, blockdev.ErrOutOfRange) {
			return nil
		}
		return err
	}
	run := g.run
	running := func() bool {
		select {
		case <-done:
			return false
		default:
			return true
		}
	}
	run("writer", func(rng *rand.Rand) error {
		p := make([]byte, 3*cs)
		for running() {
			off := rng.Int64N(big/512) * 512
			n := min(int64(len(p)), (1+rng.Int64N(int64(len(p))/512))*512, big-off)
			if rng.IntN(8) == 0 {
				if err := outOfRangeOK(v.WriteZeroes(off, n)); err != nil {
					return err
				}
				continue
			}
			if _, err := v.WriteAt(p[:n], off); outOfRangeOK(err) != nil {
				return err
			}
		}
		return nil
	})
	run("reader", func(rng *rand.Rand) error {
		p := make([]byte, 3*cs)
		for running() {
			off := rng.Int64N(big/512) * 512
			n := min(int64(len(p)), big-off)
			if _, err := v.ReadAt(p[:n], off); outOfRangeOK(err) != nil {
				return err
			}
		}
		return nil
	})
	run("checkpoint", func(*rand.Rand) error {
		for running() {
			if err := s.Checkpoint(ctx); err != nil {
				return err
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	})
	run("roller", func(rng *rand.Rand) error {
		defer stop.Do(func() { close(done) })
		for range rounds {
			name := names[rng.IntN(len(names))]
			to, err := s.OpenVolume(name)
			if err != nil {
				return err
			}
			err = s.Rollback(ctx, v, to)
			_ = to.Close()
			if err != nil {
				return fmt.Errorf("rollback to %s: %w", name, err)
			}
			if got := v.Size(); got > big {
				return fmt.Errorf("size %d after a rollback to %s", got, name)
			}
			if err := s.Resize("v", big, ResizeOptions{}); err != nil {
				return err
			}
		}
		return nil
	})
	g.wait(t)
	require.NoError(t, s.WaitIdle(ctx))
	require.NoError(t, s.Check())
	for _, name := range names {
		snap := mustOpen(t, s, name)
		require.True(t, bytes.Equal(snaps[name], blockdevtest.ReadAll(t, snap)), "snapshot %s changed", name)
		require.NoError(t, s.Rollback(ctx, v, snap))
		require.EqualValues(t, len(snaps[name]), v.Size(), "rollback to %s", name)
		require.True(t, bytes.Equal(snaps[name], blockdevtest.ReadAll(t, v)), "rollback to %s", name)
		require.NoError(t, s.Resize("v", big, ResizeOptions{}))
		tail := make([]byte, big-len(snaps[name]))
		_, err := v.ReadAt(tail, int64(len(snaps[name])))
		require.NoError(t, err)
		require.True(t, blockdev.IsZero(tail), "grow after a rollback to %s reads zeros", name)
		require.NoError(t, snap.Close())
	}
	require.NoError(t, s.Check())
}

// raceGroup runs a test's racing goroutines: each named, with a random
// source of its own (the seed and its name's length), its error reported
// with its name; onErr (if set) runs at a goroutine's first error, so
// that the others can stop.
type raceGroup struct {
	wg    sync.WaitGroup
	seed  uint64
	mu    sync.Mutex
	errs  []error
	onErr func()
}

func newRaceGroup(seed uint64, onErr func()) *raceGroup {
	return &raceGroup{seed: seed, onErr: onErr}
}

func (g *raceGroup) run(name string, fn func(rng *rand.Rand) error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		if err := fn(rand.New(rand.NewPCG(g.seed, uint64(len(name))))); err != nil {
			g.mu.Lock()
			g.errs = append(g.errs, fmt.Errorf("%s: %w", name, err))
			g.mu.Unlock()
			if g.onErr != nil {
				g.onErr()
			}
		}
	}()
}

// wait waits for every goroutine and fails t with their errors.
func (g *raceGroup) wait(t testing.TB) {
	t.Helper()
	g.wg.Wait()
	require.NoError(t, errors.Join(g.errs...))
}
