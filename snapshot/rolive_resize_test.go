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

// roliveLivePast counts the live entries of v's branch at or past chunk
// end, read from the index itself (Mappings stops at the volume's size).
func roliveLivePast(t *testing.T, s *Store, v *Volume, end uint64) int {
	t.Helper()
	b := v.meta.branch
	n := 0
	require.NoError(t, s.ix.ascend(entry{b: b, c: end}, func(x entry) bool {
		if x.b != b {
			return false
		}
		if x.e == epochLive {
			n++
		}
		return true
	}))
	return n
}

// A shrinking Resize on a full metadata region: its records free entries
// (or re-key those a snapshot needs), so they may use the delete reserve,
// and a batch too large for what is left goes in halves. Before, the
// first batch was refused with ErrNoSpace after the new size was logged,
// and the tail's entries stayed, holding the region full. Here, on a
// region clone c filled: the shrink of clone b, whose snapshot needs its
// tail (moves), succeeds and leaves the snapshot as it was; the shrink of
// c frees room that new entries take; no live entry is left past either
// end; Check passes before and after a reopen.
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
	b, err := s.CreateClone("b", s.Origin())
	require.NoError(t, err)
	for range 200 {
		x := rng.Int64N(b.Size()/growChunk/8) * 8
		require.NoError(t, b.Discard(x*growChunk, 8*growChunk))
	}
	bs, err := s.CreateSnapshot("bs", b)
	require.NoError(t, err)
	want := roliveZeroChunks(t, s, bs)
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	fillMetadata(t, c, rng)
	mustCheck(t, s)

	bSize, cSize := b.Size()/4, c.Size()/8
	require.NoError(t, s.Resize("b", bSize, ResizeOptions{Shrink: true}), "moves on a full region")
	require.NoError(t, s.Resize("c", cSize, ResizeOptions{Shrink: true}))
	require.Equal(t, bSize, b.Size())
	require.Equal(t, cSize, c.Size())
	require.Zero(t, roliveLivePast(t, s, b, uint64(bSize/growChunk)), "live entries of b past its end")
	require.Zero(t, roliveLivePast(t, s, c, uint64(cSize/growChunk)), "live entries of c past its end")
	mustCheck(t, s)
	require.Equal(t, want, roliveZeroChunks(t, s, bs), "the snapshot changed")
	// The freed room takes new entries (in c, and in a new clone).
	d, err := s.CreateClone("d", s.Origin())
	require.NoError(t, err)
	for range 100 {
		require.NoError(t, d.Discard(rng.Int64N(d.Size()/growChunk)*growChunk, growChunk))
		require.NoError(t, c.Discard(rng.Int64N(cSize/growChunk)*growChunk, growChunk))
	}
	mustCheck(t, s)
	require.NoError(t, s.Close())

	s, err = Open(origin, store, growMetaOpts)
	require.NoError(t, err)
	mustCheck(t, s)
	bs = mustOpen(t, s, "bs")
	require.Equal(t, want, roliveZeroChunks(t, s, bs), "the snapshot changed after a reopen")
}
