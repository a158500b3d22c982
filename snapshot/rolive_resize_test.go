package snapshot

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// roliveZeroChunks lists the chunks of v that read as zero mappings.
func roliveZeroChunks(t *testing.T, s *Store, v *Volume) map[int64]bool {
	t.Helper()
	maps, err := s.Mappings(v)
	require.NoError(t, err)
	zero := map[int64]bool{}
	for _, m := range maps {
		if m.Zero {
			for off := m.Off; off < m.Off+m.Len; off += s.cs {
				zero[off/s.cs] = true
			}
		}
	}
	return zero
}

// A shrinking Resize on a full metadata region: its records free entries
// (or re-key those a snapshot needs), so they may use the delete reserve,
// and a batch too large for what is left goes in halves. Before, the
// first batch was refused with ErrNoSpace after the new size was logged,
// and the tail's entries stayed, holding the region full. Here the shrink
// succeeds, the snapshot taken part way through the fill reads as it did,
// new entries fit again, and Check passes before and after a reopen.
func TestRoliveShrinkFullMetadata(t *testing.T) {
	skipUnderRace(t) // filling the region takes minutes under -race
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 7))
	origin, err := blockdev.NewMem(64<<30, 4096) // sparse
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	s, err := Format(origin, store, growMetaOpts)
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	// Entries a snapshot needs: the shrink moves those past the new end.
	for range 200 {
		x := rng.Int64N(c.Size()/growChunk/8) * 8
		require.NoError(t, c.Discard(x*growChunk, 8*growChunk))
	}
	cs, err := s.CreateSnapshot("cs", c)
	require.NoError(t, err)
	want := roliveZeroChunks(t, s, cs)
	fillMetadata(t, c, rng)
	mustCheck(t, s)

	size := c.Size() / 4
	require.NoError(t, s.Resize("c", size, ResizeOptions{Shrink: true}))
	require.Equal(t, size, c.Size())
	mustCheck(t, s)
	require.Equal(t, want, roliveZeroChunks(t, s, cs), "the snapshot changed")
	for c := range roliveZeroChunks(t, s, c) {
		require.Less(t, c*growChunk, size, "an entry past the new end is still mapped")
	}
	// The freed room takes new entries (in the volume, and in another).
	d, err := s.CreateClone("d", s.Origin())
	require.NoError(t, err)
	for range 100 {
		require.NoError(t, d.Discard(rng.Int64N(d.Size()/growChunk)*growChunk, growChunk))
		require.NoError(t, c.Discard(rng.Int64N(size/growChunk)*growChunk, growChunk))
	}
	mustCheck(t, s)
	require.NoError(t, s.Close())

	s, err = Open(origin, store, growMetaOpts)
	require.NoError(t, err)
	mustCheck(t, s)
	cs = mustOpen(t, s, "cs")
	require.Equal(t, want, roliveZeroChunks(t, s, cs), "the snapshot changed after a reopen")
}
