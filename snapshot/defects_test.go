package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Regression tests for four defects a review found by driving the store
// as a user would: a lock-order deadlock in the emergency checkpoint,
// operations racing Delete on the volume being deleted, freed chunks not
// reused before ErrNoSpace, and a checkpoint that outgrew its slot.

// hangGuard turns a hang into a failure with a goroutine dump: f runs in
// its own goroutine, and if it has not returned after limit (far beyond
// what the work needs on any machine) every goroutine's stack is printed
// and the test binary exits with a failure (a hung store cannot even be
// closed, so the test's deferred cleanup would hang too). It is not a
// speed assertion.
func hangGuard(t *testing.T, limit time.Duration, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(limit):
		_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
		fmt.Fprintf(os.Stderr, "--- FAIL: %s: no progress after %v: hung (goroutine dump above)\n", t.Name(), limit)
		os.Exit(1)
	}
}

// TestEmergencyCheckpointWithSnapshotReadsAndCloneDiscards: a small
// journal on a store whose flushes are slow, so the background checkpoint
// falls behind and the foreground (emergency) checkpoint runs, while a
// copy-on-write writer on the origin, a discarder on a clone and a reader
// of a snapshot run together. The emergency checkpoint used to take
// reclaim under mu (the reverse of a reader's order) and hang.
func TestEmergencyCheckpointWithSnapshotReadsAndCloneDiscards(t *testing.T) {
	seed := blockdevtest.Seed(t)
	origin, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	fillPattern(t, origin, seed)
	mem, err := blockdev.NewMem(32<<20, 512)
	require.NoError(t, err)
	store := blockdevtest.NewDelayed(mem, blockdevtest.DelayOptions{FlushLatency: 2 * time.Millisecond})
	s, err := Format(origin, store, Options{ChunkSize: 4 << 10, JournalSize: 128 << 10, CheckpointAt: 0.7})
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	o := s.Origin()
	snap, err := s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	cl, err := s.CreateClone("clone", snap)
	require.NoError(t, err)
	const chunks = 512 // of 1024: bounds the index well inside the checkpoint slot
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	rounds := shortScale(15000)
	hangGuard(t, 2*time.Minute, func() {
		var writers sync.WaitGroup // the reader runs until both writers are done
		writers.Add(2)
		stop := make(chan struct{})
		go func() { writers.Wait(); close(stop) }()
		wg.Add(3)
		go func() { // copy-on-write writer; new snapshots keep it copying
			defer wg.Done()
			defer writers.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			buf := make([]byte, 4<<10)
			for i := range rounds {
				if i%3000 == 2999 {
					if _, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), o); err != nil {
						errs <- err
						return
					}
				}
				if _, err := o.WriteAt(buf, rng.Int64N(chunks)*(4<<10)); err != nil {
					errs <- err
					return
				}
			}
		}()
		go func() { // clone writes and discards: frees chunks
			defer wg.Done()
			defer writers.Done()
			rng := rand.New(rand.NewPCG(seed, 2))
			buf := make([]byte, 4<<10)
			for range rounds {
				off := rng.Int64N(chunks) * (4 << 10)
				if _, err := cl.WriteAt(buf, off); err != nil {
					errs <- err
					return
				}
				if err := cl.Discard(off, 4<<10); err != nil {
					errs <- err
					return
				}
			}
		}()
		go func() { // snapshot reader
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 3))
			buf := make([]byte, 4<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := snap.ReadAt(buf, rng.Int64N(chunks)*(4<<10)); err != nil {
					errs <- err
					return
				}
			}
		}()
		wg.Wait()
	})
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	t.Logf("%d emergency checkpoints", s.emergencies.Load())
	require.Positive(t, s.emergencies.Load(), "the emergency path was not reached")
	mustCheck(t, s)
}

// TestDeleteRacesOperationsOnTheVolume deletes a clone while writes,
// discards, snapshots, clones, reads and rollbacks of it are in flight (a
// slow store flush widens the window in which they wait for the branch
// gate that Delete holds), and deletes a snapshot while the clone is
// rolled back to it. The operations used to run on the deleted branch
// after the delete and fail the whole store ("entries of unknown branch"),
// or make a snapshot mixing two volumes. Each must now either complete
// before the delete or fail with ErrInvalidSnapshot, and the store must
// stay usable and consistent. Run with -race too.
func TestDeleteRacesOperationsOnTheVolume(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for _, op := range []string{"write", "discard", "snapshot", "clone", "read", "rollback", "rollback-target"} {
		t.Run(op, func(t *testing.T) {
			origin, err := blockdev.NewMem(1<<20, 512)
			require.NoError(t, err)
			fillPattern(t, origin, seed)
			mem, err := blockdev.NewMem(32<<20, 512)
			require.NoError(t, err)
			store := blockdevtest.NewDelayed(mem, blockdevtest.DelayOptions{FlushLatency: time.Millisecond})
			s, err := Format(origin, store, Options{ChunkSize: 4 << 10, JournalSize: 256 << 10})
			require.NoError(t, err)
			defer func() { _ = s.Close() }()
			o := s.Origin()
			golden, err := s.CreateSnapshot("golden", o)
			require.NoError(t, err)
			goldenData := blockdevtest.ReadAll(t, golden)
			rng := rand.New(rand.NewPCG(seed, 5))
			hangGuard(t, 2*time.Minute, func() {
				for round := range shortScale(20) {
					cl, err := s.CreateClone("c", golden)
					require.NoError(t, err)
					want := make([]byte, origin.Size())
					for i := range want {
						want[i] = byte(round + 1)
					}
					_, err = cl.WriteAt(want, 0) // the clone differs from golden in every chunk
					require.NoError(t, err)
					cs, err := s.CreateSnapshot("cs", cl)
					require.NoError(t, err)
					victim := "c"
					if op == "rollback-target" {
						victim = "cs"
					}
					var wg sync.WaitGroup
					errs := make(chan error, 4)
					var mu sync.Mutex
					var made []*Volume // snapshots and clones of the clone
					start := make(chan struct{})
					for g := range 4 {
						wg.Add(1)
						go func() {
							defer wg.Done()
							<-start
							buf := make([]byte, 8<<10)
							for i := 0; ; i++ {
								off := int64((g*64+i)%255) * (4 << 10)
								var err error
								switch op {
								case "write":
									_, err = cl.WriteAt(buf, off)
								case "discard":
									err = cl.Discard(off, 4<<10)
								case "read": // the clone, and its parent snapshot
									got := make([]byte, 8<<10)
									if _, err = cl.ReadAt(got, off); err == nil && !bytes.Equal(got, want[off:off+8<<10]) {
										err = fmt.Errorf("read of the clone at %d: not its contents", off)
									}
									if _, gerr := golden.ReadAt(got, off); gerr != nil || !bytes.Equal(got, goldenData[off:off+8<<10]) {
										err = fmt.Errorf("read of the clone's parent at %d: %v, or not its contents", off, gerr)
									}
								case "rollback", "rollback-target":
									err = s.Rollback(context.Background(), cl, cs)
								case "snapshot", "clone":
									var v *Volume
									if op == "snapshot" {
										v, err = s.CreateSnapshot(fmt.Sprintf("r%d-g%d-%d", round, g, i), cl)
									} else {
										v, err = s.CreateClone(fmt.Sprintf("r%d-g%d-%d", round, g, i), cl)
									}
									if err == nil {
										mu.Lock()
										made = append(made, v)
										mu.Unlock()
									}
								}
								if err != nil {
									errs <- err
									return
								}
							}
						}()
					}
					close(start)
					time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond) // let some operations complete first
					_, err = s.Delete(victim)
					require.NoError(t, err)
					if victim != "c" { // the clone lives on: stop its users
						_, err = s.Delete("c")
						require.NoError(t, err)
					}
					wg.Wait()
					close(errs)
					for err := range errs {
						require.ErrorIs(t, err, ErrInvalidSnapshot, "an operation on the deleted clone")
					}
					require.NoError(t, s.usable(), "the store failed")
					got := make([]byte, origin.Size())
					for _, v := range made { // each holds the clone's contents, whole
						_, err := v.ReadAt(got, 0)
						require.NoError(t, err)
						require.Equal(t, -1, blockdevtest.FirstDiff(got, want), "volume %s of the deleted clone", v.Info().Name)
					}
					for _, vi := range s.List() { // what the racing operations made
						if vi.Kind != KindOrigin && vi.Name != "golden" {
							_, err := s.Delete(vi.Name)
							require.NoError(t, err)
						}
					}
				}
			})
			_, err = o.WriteAt(make([]byte, 4<<10), 0)
			require.NoError(t, err)
			require.NoError(t, o.Flush())
			mustCheck(t, s)
			require.NoError(t, s.Close())
			s, err = Open(origin, store, Options{})
			require.NoError(t, err)
			mustCheck(t, s)
		})
	}
}

// TestFreedChunksReusedBeforeNoSpace: a clone writes 64 chunks and trims 56
// of them; with no commit since (CommitInterval < 0, no Flush) the freed
// chunks used to stay pending, so the origin's copy-on-writes failed with
// ErrNoSpace (NoSpaceFailWrite) or deleted the snapshot "nightly"
// (NoSpaceInvalidate) while most of the store was free. An allocation that
// fails with frees pending must commit and try again.
func TestFreedChunksReusedBeforeNoSpace(t *testing.T) {
	for _, policy := range []NoSpacePolicy{NoSpaceFailWrite, NoSpaceInvalidate} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			const cs = 4 << 10
			opts := Options{ChunkSize: cs, JournalSize: 128 << 10, CommitInterval: -1, NoSpace: policy}
			dataOff := int64((superblockSize + identityLen + 128<<10 + minMetaBytes + cs - 1) / cs * cs)
			s, _, _ := newMemStore(t, 1<<20, dataOff+100*cs, opts)
			require.EqualValues(t, 100, s.geo.dataChunks)
			o := s.Origin()
			base, err := s.CreateClone("work", o) // through a hidden snapshot of the origin
			require.NoError(t, err)
			buf := make([]byte, 32*cs)
			_, err = o.WriteAt(buf, 0) // 32 copies for the hidden snapshot
			require.NoError(t, err)
			_, err = s.CreateSnapshot("nightly", o)
			require.NoError(t, err)
			big := make([]byte, 64*cs)
			_, err = base.WriteAt(big, 128*cs) // 64 clone chunks
			require.NoError(t, err)
			require.NoError(t, base.Discard(128*cs, 56*cs)) // 56 of them freed
			// 32 + 8 chunks referenced, 60 free once the trim is durable.
			_, err = o.WriteAt(buf[:16*cs], 0) // 16 copies for "nightly"
			require.NoError(t, err, "origin write with %d of 100 chunks referenced", 40)
			_, err = base.WriteAt(buf[:16*cs], 0)
			require.NoError(t, err, "clone write")
			_, err = s.OpenVolume("nightly")
			require.NoError(t, err, "snapshot nightly deleted for room a commit would have made")
			mustCheck(t, s)
		})
	}
}

// TestCloneDiscardsOutgrowCheckpointSlot: random whole-chunk discards on a
// clone of a large sparse origin add index entries with no data behind
// them, so the index is not bounded by the store's size. The checkpoint
// used to outgrow its fixed slot and fail the store (again after every
// reopen); now they fill the metadata region. The store must refuse the
// growth with ErrNoSpace before it commits and stay usable.
func TestCloneDiscardsOutgrowCheckpointSlot(t *testing.T) {
	skipUnderRace(t)
	seed := blockdevtest.Seed(t)
	origin, err := blockdev.NewMem(64<<30, 4096) // sparse: 1 Mi chunks of 64 KiB
	require.NoError(t, err)
	store, err := blockdev.NewMem(16<<20, 4096)
	require.NoError(t, err)
	var low atomic.Int64 // free metadata bytes at the last low-space call
	opts := Options{JournalSize: 256 << 10, LowMetadata: func(free, total int64) { low.Store(free + 1) }}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	cl, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(seed, 9))
	chunks := origin.Size() / s.cs
	var derr error
	n := 0
	for ; n < 500000 && derr == nil; n++ { // refused only once a tree commit would not make room
		derr = cl.Discard(rng.Int64N(chunks)*s.cs, s.cs)
	}
	t.Logf("%d discards, then: %v", n, derr)
	require.ErrorIs(t, derr, ErrNoSpace)
	st := s.Stats()
	require.Positive(t, low.Load(), "LowMetadata was not called")
	require.Less(t, low.Load()-1, st.MetadataRegion/8+(64+32)*4096+st.MetadataRegion/100, "LowMetadata called above its threshold")
	// Still usable: reads, writes that need no new entry, flushes, a
	// checkpoint, a reopen, and a delete that makes room. A write that
	// needs a new entry (the origin's copy for the clone's parent point)
	// is refused the same way, unless a tree commit in the background
	// has just released the pages the last transactions freed.
	require.NoError(t, s.usable())
	o := s.Origin()
	_, err = o.WriteAt(make([]byte, 4096), 0)
	if err != nil {
		require.ErrorIs(t, err, ErrNoSpace)
	}
	_, err = cl.ReadAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	require.NoError(t, cl.Flush())
	require.NoError(t, s.Checkpoint(context.Background()))
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	mustCheck(t, s)
	d, err := s.Delete("c")
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	cl, err = s.CreateClone("c2", s.Origin())
	require.NoError(t, err)
	require.NoError(t, cl.Discard(0, s.cs))
	mustCheck(t, s)
}

// The origin handle never is nil: after Close its calls fail with
// ErrClosed (they used to panic on a nil handle).
func TestOriginAfterClose(t *testing.T) {
	s, _, _ := newMemStore(t, 64<<10, 4<<20, Options{ChunkSize: 4 << 10})
	require.NoError(t, s.Close())
	o := s.Origin()
	require.NotNil(t, o)
	_, err := o.ReadAt(make([]byte, 4096), 0)
	require.ErrorIs(t, err, ErrClosed)
	_, err = o.WriteAt(make([]byte, 4096), 0)
	require.ErrorIs(t, err, ErrClosed)
	require.ErrorIs(t, o.Flush(), ErrClosed)
	require.ErrorIs(t, o.Discard(0, 4096), ErrClosed)
}

// A transient Format marks the store device so: a later Open is refused
// rather than finding the persistent store formatted there before (its
// journal partly overwritten by the transient store's data).
func TestTransientFormatNotOpenable(t *testing.T) {
	origin, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	s, err := Format(origin, store, Options{ChunkSize: 4 << 10})
	require.NoError(t, err)
	_, err = s.CreateSnapshot("old", s.Origin())
	require.NoError(t, err)
	require.NoError(t, s.Close())
	s, err = Format(origin, store, Options{ChunkSize: 4 << 10, Transient: true})
	require.NoError(t, err)
	_, err = s.CreateSnapshot("t", s.Origin())
	require.NoError(t, err)
	require.NoError(t, s.Close())
	_, err = Open(origin, store, Options{})
	require.ErrorIs(t, err, ErrBadOptions)
	require.ErrorContains(t, err, "transient")
}

// Closing a failed store writes out the buffered origin writes whose
// copies are durable, and names the chunks of those whose copies are not
// (it used to drop them all silently). The origin then holds the first
// write and not the second, and the snapshot holds neither. (Neither
// write touches an origin sample of the store's fingerprint: a write-out
// that does needs a store flush first, which this failed store cannot do,
// and is dropped.)
func TestFailedStoreCloseWritesOutDurable(t *testing.T) {
	const cs = 4 << 10
	origin, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 3)
	mem, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	store := blockdevtest.NewFaulty(mem)
	opts := Options{ChunkSize: cs, CommitInterval: -1}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	o := s.Origin()
	before := blockdevtest.ReadAll(t, o)
	_, err = s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	one := bytes.Repeat([]byte{1}, cs)
	_, err = o.WriteAt(one, cs) // buffered; its copy made durable next
	require.NoError(t, err)
	require.NoError(t, s.commit(context.Background()))
	_, err = o.WriteAt(bytes.Repeat([]byte{2}, cs), 5*cs) // buffered; its copy never durable
	require.NoError(t, err)
	store.FailWhen(func(c blockdevtest.Call) error {
		if c.Op == blockdevtest.OpFlush {
			return blockdev.ErrIO
		}
		return nil
	})
	require.Error(t, s.commit(context.Background()))
	require.Error(t, s.usable(), "the store has not failed")
	err = s.Close()
	require.ErrorIs(t, err, blockdev.ErrIO)
	require.ErrorContains(t, err, "1 acknowledged origin writes lost")
	require.ErrorContains(t, err, "chunks [5]")
	store.Clear()
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	mustCheck(t, s)
	want := bytes.Clone(before)
	copy(want[cs:], one)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s.Origin()), want), "origin after the failed store's close")
	snap, err := s.OpenVolume("snap")
	require.NoError(t, err)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, snap), before), "snapshot")
}

// CheckpointAt past maxCheckpointAt would leave every checkpoint to the
// foreground path; such settings (and nonsense) are refused at Format and
// Open alike.
func TestCheckpointAtRange(t *testing.T) {
	origin, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	for _, at := range []float64{0.9, 0.71, 1, -0.5, 0.01, math.NaN()} {
		_, err := Format(origin, store, Options{CheckpointAt: at})
		require.ErrorIs(t, err, ErrBadOptions, "CheckpointAt %v", at)
	}
	s, err := Format(origin, store, Options{CheckpointAt: maxCheckpointAt})
	require.NoError(t, err)
	require.NoError(t, s.Close())
	_, err = Open(origin, store, Options{CheckpointAt: 0.9})
	require.ErrorIs(t, err, ErrBadOptions)
	s, err = Open(origin, store, Options{CheckpointAt: minCheckpointAt})
	require.NoError(t, err)
	require.NoError(t, s.Close())
}
