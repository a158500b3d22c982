package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Review of the lazily looked-up preserved epochs (preserve.go): after a
// reopen every origin chunk's preserved epoch is unknown, and the first
// write to it looks it up under its stripe and Store.mu. Origin writers
// (multi-chunk, overlapping) race snapshot creates and deletes of the
// origin and readers of the snapshots; then Close comes while they still
// run. Snapshots taken before the reopen keep their contents, every
// snapshot reads the same at the end as right after it was taken, Check
// passes, and Close returns with the writers stopped by ErrClosed (a hang
// fails the test with a goroutine dump). Run with -race.
func TestReviewPreservedRace(t *testing.T) {
	seed := blockdevtest.Seed(t)
	const cs = 4 << 10
	opts := Options{ChunkSize: cs, JournalSize: 512 << 10, CommitInterval: 2 * time.Millisecond, MetadataCache: 128 << 10}
	s, origin, store := newMemStore(t, 1<<20, 32<<20, opts)
	fillPattern(t, s.Origin(), seed)
	old := map[string][]byte{}
	for i := range 3 {
		name := fmt.Sprintf("old%d", i)
		_, err := s.CreateSnapshot(name, s.Origin())
		require.NoError(t, err)
		old[name] = readAll(t, s.Origin())
		fillAt(t, s.Origin(), byte(0x10+i), int64(i)*256<<10, 128<<10)
	}
	require.NoError(t, s.Close())

	rounds := 200
	if testing.Short() {
		rounds = 50
	}
	for pass, closeEarly := range []bool{false, true} {
		s, err := Open(origin, store, opts)
		require.NoError(t, err)
		require.True(t, s.anyUnknown(0, s.chunks-1), "Open left no preserved epoch unknown")
		o := s.Origin()
		volumesAtOpen := s.Stats().Volumes
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex // guards taken
			taken    = map[string][]byte{}
			stop     atomic.Bool
			failures = make(chan error, 16)
		)
		report := func(err error) {
			if closeEarly && errors.Is(err, blockdev.ErrClosed) { // ErrClosed wraps it
				return
			}
			select {
			case failures <- err:
			default:
			}
		}
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(10*pass+i)))
				buf := make([]byte, 96<<10)
				for r := 0; r < rounds && !stop.Load(); r++ {
					n := (1 + rng.Int64N(int64(len(buf))/cs)) * cs
					off := rng.Int64N((o.Size()-n)/cs+1) * cs
					for j := range buf[:n] {
						buf[j] = byte(rng.Uint32())
					}
					if _, err := o.WriteAt(buf[:n], off); err != nil {
						report(fmt.Errorf("origin write %d at %d: %w", n, off, err))
						return
					}
				}
			}()
		}
		wg.Add(1)
		go func() { // snapshots taken, read at once, some deleted
			defer wg.Done()
			for r := 0; r < rounds/5 && !stop.Load(); r++ {
				name := fmt.Sprintf("p%d-%d", pass, r)
				v, err := s.CreateSnapshot(name, o)
				if err != nil {
					report(fmt.Errorf("snapshot %s: %w", name, err))
					return
				}
				b := make([]byte, v.Size())
				if _, err := v.ReadAt(b, 0); err != nil {
					report(fmt.Errorf("read %s: %w", name, err))
					return
				}
				if r%3 == 2 {
					if _, err := s.Delete(name); err != nil {
						report(fmt.Errorf("delete %s: %w", name, err))
						return
					}
					continue
				}
				mu.Lock()
				taken[name] = b
				mu.Unlock()
			}
		}()
		if closeEarly {
			// Close while the writers run, once two snapshots are taken:
			// they stop with ErrClosed.
			for s.Stats().Volumes < volumesAtOpen+2 && len(failures) == 0 {
				time.Sleep(time.Millisecond) // polling for progress, not a timed assertion
			}
			hangGuard(t, 2*time.Minute, func() {
				require.NoError(t, s.Close())
				wg.Wait()
			})
			close(failures)
			for err := range failures {
				require.NoError(t, err)
			}
			s, err = Open(origin, store, opts)
			require.NoError(t, err)
		} else {
			hangGuard(t, 2*time.Minute, wg.Wait)
			close(failures)
			for err := range failures {
				require.NoError(t, err)
			}
		}
		stop.Store(true)
		for name, want := range old {
			require.True(t, bytes.Equal(want, readAll(t, mustOpen(t, s, name))), "pass %d: %s changed", pass, name)
		}
		for name, want := range taken {
			require.True(t, bytes.Equal(want, readAll(t, mustOpen(t, s, name))), "pass %d: %s changed", pass, name)
		}
		require.NoError(t, s.WaitIdle(context.Background()))
		require.NoError(t, s.Check(), "pass %d", pass)
		require.NoError(t, s.Close())
	}
}
