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

// TestCrashMetadataFull fills the metadata region (the smallest one) with
// a clone's whole-chunk discards, each an index entry with no data behind
// it, and cuts the power at a random store call over and over: inside
// discards, journal commits, tree commits, write-back of a small metadata
// cache, and the refusals once the region is full. After each cut the
// store reopens on what survived and passes Check, and every discard a
// Flush acknowledged reads as a zero mapping. Once the region is full,
// discards fail with ErrNoSpace and change nothing, the store stays
// usable, and deleting the clone makes room again.
func TestCrashMetadataFull(t *testing.T) {
	skipUnderRace(t)
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 11))
	origin, err := blockdev.NewMem(64<<30, 4096) // sparse: 1 Mi chunks of 64 KiB (more entries than the region holds)
	require.NoError(t, err)
	sSim := blockdevtest.MustCrashSim(8<<20, 4096)
	opts := Options{JournalSize: 256 << 10, CommitInterval: -1, MetadataCache: 256 << 10, syncWriteBack: true}
	policies := blockdevtest.AllPolicies(seed)
	budget := blockdevtest.TortureBudget(t, 60)
	chunks := origin.Size() / (64 << 10)
	durable := map[int64]bool{} // discards a Flush acknowledged
	fulls, cuts := 0, 0
	var s *Store
	for budget.Next() && fulls < 3 {
		tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, policies[cuts%len(policies)])
		store := tr.Device("store", sSim)
		if s == nil && cuts == 0 {
			s, err = Format(origin, store, opts)
			require.NoError(t, err)
			cl, err := s.CreateClone("c", s.Origin())
			require.NoError(t, err)
			// Fill the region to the first refusal before the cuts begin
			// (ErrNoSpace comes only once a tree commit makes no room).
			for {
				c := rng.Int64N(origin.Size() / (64 << 10))
				if err := cl.Discard(c*(64<<10), 64<<10); err != nil {
					require.ErrorIs(t, err, ErrNoSpace)
					break
				}
				durable[c] = true
			}
			require.NoError(t, s.Close())
		}
		s, err = Open(origin, store, opts)
		require.NoError(t, err, "open after cut %d", cuts)
		cl, err := s.OpenVolume("c")
		if errors.Is(err, ErrNotFound) { // the cut came between a delete and the new clone
			_, err = s.CreateClone("c", s.Origin())
			require.NoError(t, err)
			cl, err = s.OpenVolume("c")
		}
		require.NoError(t, err)
		tr.Arm(blockdevtest.OpAny, 1+rng.IntN(16000))
		var pending []int64
		full := false
		for {
			c := rng.Int64N(chunks)
			err = cl.Discard(c*s.cs, s.cs)
			if errors.Is(err, ErrNoSpace) && !full {
				full = true
				fulls++
				require.NoError(t, s.usable(), "a full metadata region fails the store")
				_, rerr := cl.ReadAt(make([]byte, 4096), c*s.cs)
				if errors.Is(rerr, blockdevtest.ErrCrashed) {
					break
				}
				require.NoError(t, rerr)
				continue
			}
			if err != nil {
				break
			}
			pending = append(pending, c)
			if len(pending) >= 64 {
				if err = cl.Flush(); err != nil {
					break
				}
				for _, c := range pending {
					durable[c] = true
				}
				pending = pending[:0]
			}
		}
		if !errors.Is(err, blockdevtest.ErrCrashed) {
			// A second refusal in a row: make room by deleting the clone
			// (and start another), then cut the power there.
			require.ErrorIs(t, err, ErrNoSpace)
			d, derr := s.Delete("c")
			if derr == nil {
				derr = d.Wait(context.Background())
			}
			if derr == nil {
				clear(durable)
				_, derr = s.CreateClone("c", s.Origin())
			}
			if !errors.Is(derr, blockdevtest.ErrCrashed) {
				require.NoError(t, derr, "delete and recreate the clone of a full store")
			}
		}
		out := tr.Cut()
		_ = s.Close()
		sSim = out[0]
		cuts++
		s, err = Open(origin, sSim, opts)
		require.NoError(t, err, "open after %v", tr)
		require.NoError(t, s.WaitIdle(context.Background()))
		require.NoError(t, s.Check(), "check after %v", tr)
		st := s.Stats()
		t.Logf("after cut %d: %d entries, metadata %d of %d bytes", cuts, st.IndexEntries, st.MetadataBytes, st.MetadataRegion)
		if _, err := s.OpenVolume("c"); err == nil {
			v, _ := s.OpenVolume("c")
			maps, err := s.Mappings(v)
			require.NoError(t, err)
			zero := map[int64]bool{}
			for _, m := range maps {
				for off := m.Off; off < m.Off+m.Len; off += s.cs {
					zero[off/s.cs] = m.Zero
				}
			}
			for c := range durable {
				require.True(t, zero[c], "acknowledged discard of chunk %d lost (%v)", c, tr)
			}
		} else {
			clear(durable) // the clone's delete was acknowledged before the cut
		}
		require.NoError(t, s.Close())
		s = nil
	}
	t.Logf("%d power cuts, %d times the metadata region was full", cuts, fulls)
	if cuts >= 20 { // a short run (-short: a tenth) may end before the region fills
		require.Positive(t, fulls, "the metadata region never filled")
	}
}
