package snapshot

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// growMetaOpts: 64 KiB chunks, and the smallest metadata region
// store gets (1 MiB, in an 8 MiB store).
var growMetaOpts = Options{ChunkSize: growChunk, JournalSize: 256 << 10, CommitInterval: -1}

// fillMetadata discards runs of 8 whole chunks at random places in v
// (each chunk an index entry with no data behind it) until the metadata
// region refuses one, and returns the chunks discarded.
func fillMetadata(t *testing.T, v *Volume, rng *rand.Rand) map[int64]bool {
	t.Helper()
	done := map[int64]bool{}
	for {
		c := rng.Int64N(v.Size()/growChunk/8) * 8
		if err := v.Discard(c*growChunk, 8*growChunk); err != nil {
			require.ErrorIs(t, err, ErrNoSpace)
			return done
		}
		for i := range int64(8) {
			done[c+i] = true
		}
	}
}

// requireZeroMapped checks that every chunk of want reads as a zero
// mapping of the clone "c".
func requireZeroMapped(t *testing.T, s *Store, want map[int64]bool, msg ...any) {
	t.Helper()
	v, err := s.OpenVolume("c")
	require.NoError(t, err)
	maps, err := s.Mappings(v)
	require.NoError(t, err)
	zero := map[int64]bool{}
	for _, m := range maps {
		for off := m.Off; off < m.Off+m.Len; off += s.cs {
			zero[off/s.cs] = m.Zero
		}
	}
	for c := range want {
		require.True(t, zero[c], "chunk %d lost its zero mapping %v", c, msg)
	}
}

// A full metadata region refuses with ErrNoSpace; GrowMetadata takes data
// chunks from the top of the data region, and the store goes on: more
// entries fit, the data space no longer hands those chunks out, Check
// passes, and all of it survives a reopen.
func TestGrowMetadataFull(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 5))
	origin, err := blockdev.NewMem(64<<30, 4096) // sparse
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	s, err := Format(origin, store, growMetaOpts)
	require.NoError(t, err)
	cl, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	discarded := fillMetadata(t, cl, rng)
	before := s.Stats()

	_, err = s.GrowMetadata(context.Background(), 0)
	require.ErrorIs(t, err, ErrBadOptions)
	added, err := s.GrowMetadata(context.Background(), 1<<20-1) // rounded up to chunks
	require.NoError(t, err)
	require.Equal(t, int64(1<<20), added)
	after := s.Stats()
	require.Equal(t, before.MetadataRegion+added, after.MetadataRegion)
	require.Equal(t, before.dataChunks()-16, after.dataChunks())
	require.Equal(t, before.usedChunks(), after.usedChunks())

	// The data space fills without touching the region's chunks.
	g, err := s.CreateSnapshot("g", s.Origin())
	require.NoError(t, err)
	d, err := s.CreateClone("d", g)
	require.NoError(t, err)
	end := fillUntilFull(t, d, 0)
	require.EqualValues(t, after.dataChunks(), end, "data chunks written")
	mustCheck(t, s)

	more := fillMetadata(t, cl, rng)
	require.Greater(t, len(more), len(discarded)/4, "the grown region took few entries")
	for c := range more {
		discarded[c] = true
	}
	mustCheck(t, s)
	require.NoError(t, s.Close())

	s, err = Open(origin, store, growMetaOpts)
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, after.MetadataRegion, s.Stats().MetadataRegion)
	requireZeroMapped(t, s, discarded)
	d = mustOpen(t, s, "d")
	for c := int64(0); c < end; c++ {
		require.Equal(t, byte(c), amReadAt(t, d, c*growChunk)[0], "chunk %d", c)
	}
	mustCheck(t, s)
}

// GrowMetadata cut short by a power cut at each of its device calls in
// turn, under every crash policy: the store reopens with the region either
// as it was or grown (grown whenever GrowMetadata returned), Check passes,
// acknowledged entries are kept, and a grown region takes new ones.
func TestGrowMetadataInterrupted(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 6))
	origin, err := blockdev.NewMem(64<<30, 4096)
	require.NoError(t, err)
	base := blockdevtest.MustCrashSim(8<<20, 4096)
	s, err := Format(origin, base, growMetaOpts)
	require.NoError(t, err)
	cl, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	discarded := fillMetadata(t, cl, rng)
	region := s.Stats().MetadataRegion
	require.NoError(t, s.Close())
	img, err := base.Image()
	require.NoError(t, err)

	policies := blockdevtest.AllPolicies(seed)
	grown := 0
	for k := 1; ; k++ {
		sim := blockdevtest.MustCrashSim(int64(len(img)), 4096)
		_, err := sim.WriteAt(img, 0)
		require.NoError(t, err)
		require.NoError(t, sim.Flush())
		tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, policies[k%len(policies)])
		s, err := Open(origin, tr.Device("store", sim), growMetaOpts)
		require.NoError(t, err)
		tr.Arm(blockdevtest.OpAny, k)
		_, gerr := s.GrowMetadata(context.Background(), 1<<20)
		fired := tr.Fired()
		out := tr.Cut()
		_ = s.Close()
		if !fired {
			require.NoError(t, gerr)
			t.Logf("%d cut points, %d of them left the region grown", k-1, grown)
			return
		}
		if !errors.Is(gerr, blockdevtest.ErrCrashed) {
			require.NoError(t, gerr, "cut %v", tr)
		}
		s, err = Open(origin, out[0], growMetaOpts)
		require.NoError(t, err, "open after %v", tr)
		got := s.Stats().MetadataRegion
		if gerr == nil {
			require.Equal(t, region+1<<20, got, "an acknowledged grow was lost (%v)", tr)
		} else {
			require.Contains(t, []int64{region, region + 1<<20}, got, "%v", tr)
		}
		require.NoError(t, s.WaitIdle(context.Background()))
		require.NoError(t, s.Check(), "check after %v", tr)
		requireZeroMapped(t, s, discarded, tr)
		if got > region {
			grown++
			v := mustOpen(t, s, "c")
			for i := 0; i < 200; i++ {
				c := rng.Int64N(v.Size() / growChunk)
				require.NoError(t, v.Discard(c*growChunk, growChunk), "a discard after the grow (%v)", tr)
			}
			mustCheck(t, s)
		}
		require.NoError(t, s.Close())
	}
}
