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

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Review of GrowMetadata where it meets Grow, blank volumes, read-only
// opens and concurrent I/O.

// GrowMetadata, then Grow on a larger device, then GrowMetadata again, in a
// store without an origin whose blank volume fills the data space: the
// second grow takes the chunks Grow added, both extents survive reopens
// (read-write and read-only), and every acknowledged entry and chunk of
// data is kept.
func TestReviewGrowMetadataThenGrow(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 8))
	ctx := context.Background()
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := growMetaOpts
	opts.MaxVolumeSize = 64 << 30
	s, err := Format(nil, store, opts)
	require.NoError(t, err)
	z, err := s.CreateVolume("c", 64<<30) // zero mappings: entries without data
	require.NoError(t, err)
	d, err := s.CreateVolume("d", 64<<20) // data
	require.NoError(t, err)
	zeroed := fillMetadata(t, z, rng)
	region := s.Stats().MetadataRegion

	added, err := s.GrowMetadata(ctx, 2*growChunk)
	require.NoError(t, err)
	end := fillUntilFull(t, d, 0)
	discardSome(t, z, rng, zeroed)
	mustCheck(t, s)
	require.NoError(t, s.Close())

	big := biggerCopy(t, store, 12<<20)
	s, err = Open(nil, big, opts)
	require.NoError(t, err)
	grown, err := s.Grow()
	require.NoError(t, err)
	require.Equal(t, int64(4<<20), grown)
	// The second extent comes from the chunks Grow added, above the first.
	added2, err := s.GrowMetadata(ctx, 4*growChunk)
	require.NoError(t, err)
	require.Equal(t, region+added+added2, s.Stats().MetadataRegion)
	discardSome(t, mustOpen(t, s, "c"), rng, zeroed)
	d = mustOpen(t, s, "d")
	end = fillUntilFull(t, d, end)
	mustCheck(t, s)
	require.NoError(t, s.Close())

	check := func(s *Store, what string) {
		require.Equal(t, region+added+added2, s.Stats().MetadataRegion, what)
		requireZeroMapped(t, s, zeroed, what)
		d := mustOpen(t, s, "d")
		for c := int64(0); c < end; c++ {
			require.Equal(t, byte(c), amReadAt(t, d, c*growChunk)[0], "%s: chunk %d", what, c)
		}
		require.NoError(t, s.Check(), what)
	}
	ro := opts
	ro.ReadOnly = true
	r, err := Open(nil, big, ro)
	require.NoError(t, err)
	check(r, "read-only")
	require.NoError(t, r.Close())
	s, err = Open(nil, big, opts)
	require.NoError(t, err)
	defer s.Close()
	check(s, "reopened")
	// Deletes free entries: the grown region takes new ones again.
	_, err = s.Delete("c")
	require.NoError(t, err)
	require.NoError(t, s.WaitIdle(ctx))
	v, err := s.CreateVolume("e", 1<<30)
	require.NoError(t, err)
	require.NoError(t, v.WriteZeroes(0, 64*growChunk))
	mustCheck(t, s)
}

// discardSome discards 100 runs of 8 chunks at random places in v, as
// fillMetadata does, and adds them to done.
func discardSome(t *testing.T, v *Volume, rng *rand.Rand, done map[int64]bool) {
	t.Helper()
	for range 100 {
		c := rng.Int64N(v.Size()/growChunk/8) * 8
		require.NoError(t, v.Discard(c*growChunk, 8*growChunk))
		for i := range int64(8) {
			done[c+i] = true
		}
	}
}

// GrowMetadata while writers on a blank volume, a clone and the origin
// run, snapshots are taken and deleted, and the background committer
// commits the tree: every write reads back, Check passes, and a reopen
// reads the same. Run with -race.
func TestReviewGrowMetadataConcurrent(t *testing.T) {
	seed := blockdevtest.Seed(t)
	ctx := context.Background()
	const cs = 16 << 10
	opts := Options{ChunkSize: cs, JournalSize: 256 << 10, MetadataBytes: 1 << 20, CommitInterval: time.Millisecond, MetadataCache: 64 << 10}
	s, origin, store := newMemStore(t, 2<<20, 48<<20, opts)
	blank, err := s.CreateVolume("blank", 4<<20)
	require.NoError(t, err)
	g, err := s.CreateSnapshot("g", s.Origin())
	require.NoError(t, err)
	cl, err := s.CreateClone("cl", g)
	require.NoError(t, err)

	rounds := 150
	if testing.Short() {
		rounds = 40
	}
	// Each writer owns its volume and keeps what it wrote last per chunk.
	type writer struct {
		v    *Volume
		want map[int64]byte
	}
	writers := []*writer{{v: blank, want: map[int64]byte{}}, {v: cl, want: map[int64]byte{}}, {v: s.Origin(), want: map[int64]byte{}}}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i, w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			buf := make([]byte, cs)
			for r := range rounds {
				c := rng.Int64N(w.v.Size() / cs)
				b := byte(1 + r%250)
				for j := range buf {
					buf[j] = b
				}
				if _, err := w.v.WriteAt(buf, c*cs); err != nil {
					errs <- fmt.Errorf("%s: write chunk %d: %w", w.v.Info().Name, c, err)
					return
				}
				w.want[c] = b
				if r%16 == 0 {
					if err := w.v.Flush(); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // snapshots of the three volumes taken and deleted
		defer wg.Done()
		for r := range rounds / 4 {
			w := writers[r%len(writers)]
			name := fmt.Sprintf("snap%d", r)
			if _, err := s.CreateSnapshot(name, w.v); err != nil {
				errs <- fmt.Errorf("snapshot %s: %w", name, err)
				return
			}
			if r%2 == 1 {
				if _, err := s.Delete(name); err != nil {
					errs <- fmt.Errorf("delete %s: %w", name, err)
					return
				}
			}
		}
	}()
	grows := 0
	for range 8 {
		if _, err := s.GrowMetadata(ctx, cs); err != nil {
			errs <- fmt.Errorf("grow metadata: %w", err)
			break
		}
		grows++
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, 8, grows)
	region := s.Stats().MetadataRegion
	verify := func(s *Store, what string) {
		for _, w := range writers {
			v := mustOpen(t, s, w.v.Info().Name)
			for c, b := range w.want {
				got := make([]byte, cs)
				_, err := v.ReadAt(got, c*cs)
				require.NoError(t, err)
				require.Equal(t, bytes.Repeat([]byte{b}, cs), got, "%s: %s chunk %d", what, w.v.Info().Name, c)
			}
		}
		require.NoError(t, s.WaitIdle(ctx))
		require.NoError(t, s.Check(), what)
		require.Equal(t, region, s.Stats().MetadataRegion, what)
	}
	verify(s, "live")
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	verify(s, "reopened")
}

// A Grow cut short after its superblock write and before the tree commit
// that makes the grown data space map durable, in a store whose metadata
// region has grown into data chunks: Open adopts the superblock's larger
// data region (growing the map past the extents), and Check passes.
func TestReviewGrowInterruptedAfterGrowMetadata(t *testing.T) {
	ctx := context.Background()
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := growMetaOpts
	opts.MaxVolumeSize = 1 << 30
	s, err := Format(nil, store, opts)
	require.NoError(t, err)
	_, err = s.GrowMetadata(ctx, growChunk)
	require.NoError(t, err)
	chunks := s.Stats().dataChunks()
	require.NoError(t, s.Close())

	big := biggerCopy(t, store, 12<<20)
	s, err = Open(nil, big, opts)
	require.NoError(t, err)
	_, err = s.Grow()
	require.NoError(t, err)
	img := crashImage(t, big) // the superblock says grown; the tree does not
	require.NoError(t, s.Close())

	s, err = Open(nil, img, Options{TakeOver: true})
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, chunks+64, s.Stats().dataChunks())
	require.NoError(t, s.Check())
	v, err := s.CreateVolume("v", 16<<20)
	require.NoError(t, err)
	end := fillUntilFull(t, v, 0)
	require.Greater(t, end, int64(64))
	mustCheck(t, s)
}
