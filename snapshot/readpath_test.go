package snapshot

import (
	"bytes"
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

// TestSnapshotReadsRaceOriginWrites reads snapshots while origin writers
// copy their chunks: a read that resolved to the origin device must never
// see data written after the snapshot (the copy slipping between the
// resolution and the read), whichever way the read took its origin stripe.
// The origin device delays the snapshot reads' partial-chunk reads so that
// a read not holding its stripe would be caught. Run with -race.
func TestSnapshotReadsRaceOriginWrites(t *testing.T) {
	for _, buf := range []int64{0, -1} {
		t.Run(fmt.Sprintf("originbuffer=%d", buf), func(t *testing.T) { snapshotReadsRaceOriginWrites(t, buf) })
	}
}

func snapshotReadsRaceOriginWrites(t *testing.T, originBuffer int64) {
	seed := blockdevtest.Seed(t)
	const cs = 4 << 10
	mem, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	fillPattern(t, mem, 1)
	store, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	origin := &slowSmallReads{Device: mem, below: cs}
	s, err := Format(origin, store, Options{ChunkSize: cs, JournalSize: 256 << 10, OriginBuffer: originBuffer})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	o := s.Origin()
	chunks := origin.Size() / cs
	var snaps []*Volume
	var models [][]byte
	takeSnap := func() {
		m := make([]byte, origin.Size())
		_, err := o.ReadAt(m, 0)
		require.NoError(t, err)
		v, err := s.CreateSnapshot(fmt.Sprintf("s%d", len(snaps)), o)
		require.NoError(t, err)
		snaps, models = append(snaps, v), append(models, m)
	}
	takeSnap()

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	// startWriters runs two writers of random whole and partial chunks
	// until stop; gen tells the rounds' generators apart.
	startWriters := func(gen uint64) {
		stop.Store(false)
		for w := range uint64(2) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, gen*2+w))
				p := make([]byte, cs)
				for !stop.Load() {
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					n := int64(512 << rng.IntN(4))
					off := rng.Int64N(chunks)*cs + rng.Int64N(cs/n)*n
					if _, err := o.WriteAt(p[:n], off); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	startWriters(0)
	rng := rand.New(rand.NewPCG(seed, 99))
	got := make([]byte, 512)
	for round := range 3 {
		for range 300 {
			i := rng.IntN(len(snaps))
			off := rng.Int64N(origin.Size()/512) * 512
			_, err := snaps[i].ReadAt(got, off)
			require.NoError(t, err)
			require.True(t, bytes.Equal(models[i][off:off+512], got), "snapshot %d offset %d (round %d)", i, off, round)
		}
		stop.Store(true)
		wg.Wait() // a consistent model needs the writers paused
		takeSnap()
		startWriters(uint64(round) + 1)
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.NoError(t, s.Check())
}

// slowSmallReads delays reads shorter than below (a snapshot read of part
// of a chunk; copy-on-write reads whole chunks) before doing them, which
// widens the window in which an origin write could slip between a read's
// resolution and its read of the origin device.
type slowSmallReads struct {
	blockdev.Device
	below int
}

func (d *slowSmallReads) ReadAt(p []byte, off int64) (int, error) {
	if len(p) < d.below {
		time.Sleep(time.Millisecond)
	}
	return d.Device.ReadAt(p, off)
}

// TestSnapshotReadOfCopiedChunkIgnoresOriginStripe: a read that resolves
// to a store chunk does not wait for the origin stripe, so an origin
// writer or the origin buffer's drain holding it does not stall snapshot
// reads (the SnapshotRead benchmark's slow start after an overwrite). That
// a read resolving to the origin still waits for it is what
// TestSnapshotReadsRaceOriginWrites checks.
func TestSnapshotReadOfCopiedChunkIgnoresOriginStripe(t *testing.T) {
	const cs = 4 << 10
	s, origin, _ := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs})
	o := s.Origin()
	old := make([]byte, origin.Size())
	_, err := o.ReadAt(old, 0)
	require.NoError(t, err)
	snap, err := s.CreateSnapshot("s", o)
	require.NoError(t, err)
	_, err = o.WriteAt(bytes.Repeat([]byte{0xab}, cs), 0) // chunk 0 copied
	require.NoError(t, err)

	st := &s.originLocks[0]
	st.Lock()
	done := make(chan error, 1)
	got := make([]byte, cs)
	go func() {
		_, err := snap.ReadAt(got, 0)
		done <- err
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
		require.Equal(t, old[:cs], got)
	case <-time.After(time.Minute): // a hang detector, not a speed check
		st.Unlock()
		<-done
		t.Fatal("a read of a copied chunk waited for the origin stripe held by a writer")
	}

	st.Unlock()
}
