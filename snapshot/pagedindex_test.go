package snapshot

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// TestPagedIndexMatchesIndex runs random puts and deletes on the in-memory
// index and on the paged index side by side, with commits and reopens of
// the paged one and a cache far smaller than it, and requires every query
// the store makes to answer the same.
func TestPagedIndexMatchesIndex(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	dev, err := blockdev.NewMem(2048*meta.PageSize, 4096)
	require.NoError(t, err)
	opts := meta.Options{DataChunks: 1 << 16, CacheBytes: 32 << 10}
	m, err := meta.Format(dev, opts)
	require.NoError(t, err)
	pi := pagedIndex{m: m}
	ix := newIndex()
	epochs := []uint32{1, 2, 3, 5, 8, epochLive}
	randKey := func() (uint32, uint64, uint32) {
		return rng.Uint32N(3), rng.Uint64N(400), epochs[rng.IntN(len(epochs))]
	}
	for step := range 4000 {
		b, c, e := randKey()
		switch op := rng.IntN(10); {
		case op < 5:
			if _, ok := ix.get(b, c, e); ok {
				got, err := pi.put(entry{b: b, c: c, e: e, loc: locZero})
				require.NoError(t, err)
				require.False(t, got, "put of a present key")
				continue
			}
			loc := uint64(locZero)
			switch rng.IntN(10) {
			case 0:
			case 1:
				loc = locInherit
			default:
				loc, err = m.AllocData() // the layer's space map owns data chunks
				require.NoError(t, err)
			}
			require.True(t, ix.put(entry{b: b, c: c, e: e, loc: loc}))
			got, err := pi.put(entry{b: b, c: c, e: e, loc: loc})
			require.NoError(t, err)
			require.True(t, got, "put")
		case op < 7:
			want, wok := ix.del(b, c, e)
			got, ok, err := pi.del(b, c, e)
			require.NoError(t, err)
			require.Equal(t, wok, ok)
			require.Equal(t, want, got, "del")
			if ok && got.isData() {
				require.NoError(t, m.FreeData(got.loc))
			}
		default:
			q := []func(uint32, uint64, uint32) (entry, bool){ix.get, ix.seek, ix.prev}
			p := []func(uint32, uint64, uint32) (entry, bool, error){pi.get, pi.seek, pi.prev}
			for i := range q {
				want, wok := q[i](b, c, e)
				got, ok, err := p[i](b, c, e)
				require.NoError(t, err)
				require.Equal(t, wok, ok, "query %d (%d,%d,%d)", i, b, c, e)
				require.Equal(t, want, got, "query %d (%d,%d,%d)", i, b, c, e)
			}
			want, wok := ix.last(b, c)
			got, ok, err := pi.last(b, c)
			require.NoError(t, err)
			require.Equal(t, wok, ok)
			require.Equal(t, want, got, "last")
		}
		if step%500 == 499 {
			comparePagedIndex(t, ix, pi)
			require.NoError(t, m.Commit())
			if rng.IntN(2) == 0 {
				require.NoError(t, m.Close())
				m, err = meta.Open(dev, opts)
				require.NoError(t, err)
				pi = pagedIndex{m: m}
			}
		}
	}
	comparePagedIndex(t, ix, pi)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
}

// comparePagedIndex compares the scans: per-branch epochs, entries per
// epoch, presence and size.
func comparePagedIndex(t *testing.T, ix index, pi pagedIndex) {
	t.Helper()
	require.Equal(t, ix.len(), pi.len())
	for b := uint32(0); b < 4; b++ {
		has, err := pi.branchHas(b)
		require.NoError(t, err)
		require.Equal(t, ix.branchHas(b), has, "branch %d", b)
		var we, ge []uint32
		ix.branchEpochs(b, func(e uint32) bool { we = append(we, e); return true })
		require.NoError(t, pi.branchEpochs(b, func(e uint32) bool { ge = append(ge, e); return true }))
		require.Equal(t, we, ge, "epochs of branch %d", b)
		for _, e := range we {
			for _, from := range []uint64{0, 150} {
				var wx, gx []entry
				ix.epochEntries(b, e, from, func(x entry) bool { wx = append(wx, x); return true })
				require.NoError(t, pi.epochEntries(b, e, from, func(x entry) bool { gx = append(gx, x); return true }))
				require.Equal(t, wx, gx, "entries of branch %d epoch %d from %d", b, e, from)
			}
		}
		// epochChunks over ranges of epochs: the model's entries epoch by
		// epoch, each in chunk order, with hi itself only with hiToo, and
		// stopping where fn says.
		bounds := append([]uint32{0, 1, epochLive}, we...)
		for _, lo := range bounds {
			for _, hi := range bounds {
				for _, hiToo := range []bool{false, true} {
					var want [][2]uint64
					for _, e := range we {
						if e < lo || e > hi || (e == hi && !hiToo) {
							continue
						}
						ix.epochEntries(b, e, 0, func(x entry) bool { want = append(want, [2]uint64{x.c, uint64(x.e)}); return true })
					}
					var got [][2]uint64
					require.NoError(t, pi.epochChunks(b, lo, hi, hiToo, func(c uint64, e uint32) bool {
						got = append(got, [2]uint64{c, uint64(e)})
						return true
					}))
					require.Equal(t, want, got, "epochChunks of branch %d [%d, %d] hiToo %v", b, lo, hi, hiToo)
					if len(want) > 3 {
						got = got[:0]
						require.NoError(t, pi.epochChunks(b, lo, hi, hiToo, func(c uint64, e uint32) bool {
							got = append(got, [2]uint64{c, uint64(e)})
							return len(got) < 3
						}))
						require.Equal(t, want[:3], got, "epochChunks of branch %d stopped after 3", b)
					}
				}
			}
		}
	}
}
