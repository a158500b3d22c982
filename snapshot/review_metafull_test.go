package snapshot

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Once the metadata region refuses a clone's discards with ErrNoSpace, it
// is really full: a tree commit, which releases the pages the open
// transaction's shadows held, makes no room (paged's code refused records
// while the committed tree used a third of the region). The store stays
// usable without a power cut: the refused discard changed nothing,
// snapshots and a rename (no index change) are taken, tree commits
// succeed, Close and Open work. Deleting a clone while a snapshot of it
// holds its entries makes the collector move them to the snapshot's
// epoch: records that delete and put, let through on the delete reserve,
// whose puts must be too (paged's code refused the first put half way
// through the record, and the store failed). The delete runs to the end,
// the snapshot reads as before, and once the filler is deleted discards
// fit again.
func TestReviewMetadataFullStaysUsable(t *testing.T) {
	skipUnderRace(t)
	ctx := context.Background()
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 3))
	origin, err := blockdev.NewMem(4<<30, 4096) // sparse: 1 Mi chunks of 4 KiB
	require.NoError(t, err)
	for i := range int64(64) { // some origin data for the clones to share
		_, err := origin.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 64<<10), i*(64<<20))
		require.NoError(t, err)
	}
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := Options{ChunkSize: 4096, JournalSize: 256 << 10, CommitInterval: -1}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	chunks := origin.Size() / s.cs

	// b: a clone with a few discards (live entries) and a snapshot of it.
	b, err := s.CreateClone("b", s.Origin())
	require.NoError(t, err)
	for i := range int64(200) {
		require.NoError(t, b.Discard(i*(16<<20), s.cs))
	}
	bs, err := s.CreateSnapshot("bs", b)
	require.NoError(t, err)
	want := volumeImageSample(t, bs, s.cs, rand.New(rand.NewPCG(seed, 4)))
	require.NoError(t, b.Close())
	require.NoError(t, bs.Close())

	// c fills the region.
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	var refused int64 = -1
	for i := 0; ; i++ {
		require.Less(t, i, 1<<20, "the metadata region never filled")
		x := rng.Int64N(chunks)
		err := c.Discard(x*s.cs, s.cs)
		if errors.Is(err, ErrNoSpace) {
			refused = x
			break
		}
		require.NoError(t, err)
	}
	require.NoError(t, s.usable())
	// Really full: the pages the open transaction held are not what
	// refused it (a tree commit makes no room for it).
	require.NoError(t, s.Checkpoint(ctx))
	require.ErrorIs(t, c.Discard(refused*s.cs, s.cs), ErrNoSpace, "refused while a tree commit would have made room")
	maps, err := s.Mappings(c)
	require.NoError(t, err)
	for _, m := range maps {
		if m.Off <= refused*s.cs && refused*s.cs < m.Off+m.Len {
			require.False(t, m.Zero, "the refused discard changed the mapping")
		}
	}
	_, err = s.CreateSnapshot("cs", c)
	require.NoError(t, err)
	require.NoError(t, s.Rename("cs", "cs2"))
	require.NoError(t, s.Checkpoint(ctx))
	require.NoError(t, c.Flush())
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())

	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	require.NoError(t, s.Check())
	c = mustOpen(t, s, "c")
	require.ErrorIs(t, c.Discard(refused*s.cs, s.cs), ErrNoSpace, "still full after Open")
	require.NoError(t, c.Close())

	d, err := s.Delete("b") // the collector moves b's entries to bs's epoch
	require.NoError(t, err)
	require.NoError(t, d.Wait(ctx))
	require.NoError(t, s.WaitIdle(ctx))
	require.NoError(t, s.usable(), "the delete failed the store")
	require.NoError(t, s.Check())
	bs = mustOpen(t, s, "bs")
	require.Equal(t, want, volumeImageSample(t, bs, s.cs, rand.New(rand.NewPCG(seed, 4))))
	require.NoError(t, bs.Close())

	for _, name := range []string{"cs2", "c"} {
		d, err = s.Delete(name)
		require.NoError(t, err)
		require.NoError(t, d.Wait(ctx))
	}
	require.NoError(t, s.WaitIdle(ctx))
	require.NoError(t, s.Check())
	c, err = s.CreateClone("c2", s.Origin())
	require.NoError(t, err)
	for range 100 {
		require.NoError(t, c.Discard(rng.Int64N(chunks)*s.cs, s.cs), "after the delete")
	}
	require.NoError(t, s.Check())
}

// volumeImageSample reads 4 KiB of 64 chunks of v: half of them those
// the test wrote to the origin, half drawn from rng (the sparse origin is
// too large to read whole).
func volumeImageSample(t *testing.T, v *Volume, cs int64, rng *rand.Rand) map[int64][]byte {
	t.Helper()
	out := map[int64][]byte{}
	n := v.Size() / cs
	for i := range int64(64) { // chunks where the test wrote, and others
		off := i * (64 << 20) / cs * cs
		if i%2 == 1 {
			off = rng.Int64N(n) * cs
		}
		b := make([]byte, 4096)
		_, err := v.ReadAt(b, off)
		require.NoError(t, err)
		out[off] = b
	}
	return out
}
