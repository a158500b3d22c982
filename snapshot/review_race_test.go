package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// The background committer (a tree commit every five 1 ms intervals),
// explicit Checkpoints and a small metadata cache (page reads and
// write-back under the store's lock) race an origin writer that takes and
// deletes snapshots, a clone writer that takes snapshots of its clone and
// rolls it back to them, and a reader that checks every live snapshot
// against what it held when taken. At the end every volume reads as its
// model, Check passes, and Close then Open replays nothing: the tree
// covers the journal's last record and the volumes read the same. Run
// with -race.
func TestReviewCommitterRace(t *testing.T) {
	seed := blockdevtest.Seed(t)
	ctx := context.Background()
	const cs = 4 << 10
	opts := Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: time.Millisecond, MetadataCache: 64 << 10}
	s, origin, store := newMemStore(t, 512<<10, 32<<20, opts)
	o := s.Origin()
	size := origin.Size()
	base, err := s.CreateSnapshot("base", o)
	require.NoError(t, err)
	baseModel := blockdevtest.ReadAll(t, base)
	clone, err := s.CreateClone("k", base)
	require.NoError(t, err)

	var mu sync.Mutex // guards snaps
	snaps := map[string][]byte{"base": baseModel}
	var readGate sync.RWMutex // a read of a snapshot holds it shared; a delete, exclusively
	g := newRaceGroup(seed, nil)
	rounds := shortScale(60)

	randWrite := func(rng *rand.Rand, v interface {
		WriteAt([]byte, int64) (int, error)
	}, model []byte) error {
		off := rng.Int64N(size/cs-4) * cs
		p := make([]byte, (1+rng.Int64N(3))*cs)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if _, err := v.WriteAt(p, off); err != nil {
			return err
		}
		copy(model[off:], p)
		return nil
	}
	run := g.run
	oModel := blockdevtest.ReadAll(t, o)
	kModel := append([]byte(nil), baseModel...)
	run("origin", func(rng *rand.Rand) error {
		for i := range rounds {
			for range 8 {
				if err := randWrite(rng, o, oModel); err != nil {
					return err
				}
			}
			name := fmt.Sprintf("o%d", i)
			if _, err := s.CreateSnapshot(name, o); err != nil {
				return err
			}
			mu.Lock()
			snaps[name] = append([]byte(nil), oModel...)
			mu.Unlock()
			if i >= 3 && i%2 == 0 {
				old := fmt.Sprintf("o%d", i-3)
				readGate.Lock()
				mu.Lock()
				delete(snaps, old)
				mu.Unlock()
				_, err := s.Delete(old)
				readGate.Unlock()
				if err != nil {
					return err
				}
			}
		}
		return nil
	})
	run("clone", func(rng *rand.Rand) error {
		for i := range rounds {
			for range 6 {
				if err := randWrite(rng, clone, kModel); err != nil {
					return err
				}
			}
			if i%4 == 0 { // a whole-chunk discard frees the clone's chunk
				off := rng.Int64N(size/cs) * cs
				if err := clone.Discard(off, cs); err != nil {
					return err
				}
				clear(kModel[off : off+cs])
			}
			name := fmt.Sprintf("k%d", i)
			ks, err := s.CreateSnapshot(name, clone)
			if err != nil {
				return err
			}
			mu.Lock()
			snaps[name] = append([]byte(nil), kModel...)
			mu.Unlock()
			if i%5 == 4 { // back to the snapshot of three rounds ago
				back := fmt.Sprintf("k%d", i-3)
				mu.Lock()
				want := snaps[back]
				mu.Unlock()
				to, err := s.OpenVolume(back)
				if err != nil {
					return err
				}
				err = s.Rollback(ctx, clone, to)
				_ = to.Close()
				if err != nil {
					return err
				}
				copy(kModel, want)
			}
			_ = ks.Close()
		}
		return nil
	})
	run("reader", func(rng *rand.Rand) error {
		got := make([]byte, size)
		for range rounds * 2 {
			readGate.RLock()
			mu.Lock()
			var name string
			var want []byte
			for n, m := range snaps { // map order: any live snapshot
				name, want = n, m
				break
			}
			mu.Unlock()
			v, err := s.OpenVolume(name)
			if err == nil {
				_, err = v.ReadAt(got, 0)
				_ = v.Close()
			}
			readGate.RUnlock()
			if err != nil {
				return err
			}
			if !bytes.Equal(want, got) {
				return fmt.Errorf("snapshot %s changed", name)
			}
		}
		return nil
	})
	run("checkpoint", func(*rand.Rand) error {
		for range rounds {
			if err := s.Checkpoint(ctx); err != nil {
				return err
			}
		}
		return nil
	})
	g.wait(t)
	require.Equal(t, oModel, blockdevtest.ReadAll(t, o))
	require.Equal(t, kModel, blockdevtest.ReadAll(t, clone))
	require.NoError(t, s.WaitIdle(ctx))
	require.NoError(t, s.Check())
	want := volumeImages(t, s)
	for name, m := range snaps {
		require.True(t, bytes.Equal(m, want[name]), "snapshot %s", name)
	}
	require.NoError(t, s.Close())

	r, err := Open(origin, store, opts)
	require.NoError(t, err)
	defer r.Close()
	require.Equal(t, r.j.LastSeq(), r.treeSeq, "Close left journal records the tree does not hold")
	require.NoError(t, r.Check())
	require.Equal(t, want, volumeImages(t, r))
}
