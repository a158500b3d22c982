package snapshot

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// scalePresContents returns the (key, epoch) pairs a table holds, failing
// on a key held twice or a count that does not match.
func scalePresContents(t *testing.T, tb *presTable) map[uint64]uint32 {
	t.Helper()
	got := map[uint64]uint32{}
	for i, k := range tb.keys {
		if k == 0 {
			continue
		}
		_, dup := got[k]
		require.False(t, dup, "key %d held twice", k)
		got[k] = tb.vals[i]
		j, ok := tb.find(k)
		require.True(t, ok, "key %d in slot %d not found by its probe", k, i)
		require.Equal(t, i, j)
	}
	require.Len(t, got, tb.n)
	return got
}

// TestPresCacheModel drives one stripe of the preserved-epoch cache with
// random sets, raises and lookups against a map, with a table small
// enough that it evicts: every key it holds has the model's epoch, the
// key just set is held, an absent key is unknown once anything was
// evicted (and 0 before), and the table never exceeds its size.
func TestPresCacheModel(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 7))
	p := &presCache{maxSlots: 16}
	p.zero.Store(true)
	model := map[uint64]uint32{} // chunk -> epoch, for every chunk set
	evicted := false
	for i := range 5000 {
		c := uint64(rng.IntN(64)) * nStripes // all in stripe 0
		switch rng.IntN(3) {
		case 0:
			e := uint32(rng.IntN(100))
			p.set(c, e)
			model[c] = e
			got, ok := p.known(c)
			require.True(t, ok, "step %d: chunk %d not held after set", i, c)
			require.Equal(t, e, got)
		case 1:
			e := uint32(rng.IntN(100))
			before, wasKnown := p.known(c)
			p.raise(c, e)
			if got, held := p.t[0].get(c/nStripes + 1); held { // held before, or 0 since Format and raised
				require.True(t, wasKnown, "step %d: raise cached unknown chunk %d", i, c)
				require.Equal(t, max(before, e), got, "step %d: raise of chunk %d", i, c)
				model[c] = got
			}
		default:
			e, ok := p.known(c)
			if ok {
				require.Equal(t, model[c], e, "step %d: chunk %d", i, c)
			}
			if !evicted && !ok {
				t.Fatalf("step %d: chunk %d unknown before any eviction", i, c)
			}
		}
		got := scalePresContents(t, &p.t[0])
		require.LessOrEqual(t, len(p.t[0].keys), p.maxSlots)
		for k, e := range got {
			require.Equal(t, model[(k-1)*nStripes], e, "step %d: chunk %d", i, (k-1)*nStripes)
		}
		if len(got) < len(model) && !evicted {
			evicted = true
			require.False(t, p.zero.Load(), "step %d: an eviction left absent chunks reading 0", i)
		}
	}
	require.True(t, evicted, "the table never evicted: the test exercises nothing")
	q := p.clone()
	require.Equal(t, scalePresContents(t, &p.t[0]), scalePresContents(t, &q.t[0]))
	p.forget()
	_, ok := p.known(0)
	require.False(t, ok)
}

// TestPreservedCacheEvicts writes an origin of 8 chunks per stripe with
// the preserved-epoch cache at its smallest, 6 chunks per stripe, so the copy-on-write path keeps evicting and looking epochs up:
// every snapshot reads as taken (before and after a reopen), no chunk is
// copied twice for one snapshot (the index holds one entry per chunk
// written after each snapshot), and Check passes.
func TestPreservedCacheEvicts(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 11))
	const cs = 4096
	chunks := uint64(8 * nStripes)
	opts := Options{ChunkSize: cs}
	s, origin, store := newMemStore(t, int64(chunks)*cs, int64(chunks)*cs*6, opts)
	// The smallest tables (those of a metadata cache under 192 KiB), set
	// before any write.
	s.pres.maxSlots = presMinSlots
	o := s.Origin()
	stamps := make([]uint64, chunks) // the origin's chunk stamps (0: as formatted)
	taken := map[string][]uint64{}
	copied := map[uint64]bool{} // chunks copied since the last snapshot
	entries := int64(0)
	buf := make([]byte, cs)
	write := func(c uint64, v uint64) {
		stamp(buf, v)
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
		stamps[c] = v
		if len(taken) > 0 && !copied[c] {
			copied[c] = true
			entries++
		}
	}
	// The formatted origin is not zero everywhere: read the chunks a
	// snapshot never saw written from a copy of the device.
	initial := make([]byte, origin.Size())
	_, err := origin.ReadAt(initial, 0)
	require.NoError(t, err)
	verify := func(s *Store) {
		got, want := make([]byte, cs), make([]byte, cs)
		for name, st := range taken {
			v, err := s.OpenVolume(name)
			require.NoError(t, err)
			for range 300 {
				c := rng.Uint64N(chunks)
				_, err := v.ReadAt(got, int64(c)*cs)
				require.NoError(t, err)
				if st[c] == 0 {
					copy(want, initial[c*cs:])
				} else {
					stamp(want, st[c])
				}
				require.Equal(t, want, got, "snapshot %s chunk %d", name, c)
			}
		}
	}
	v := uint64(1)
	for snap := range 4 {
		name := fmt.Sprintf("s%d", snap)
		_, err := s.CreateSnapshot(name, o)
		require.NoError(t, err)
		taken[name] = append([]uint64(nil), stamps...)
		clear(copied)
		for range 2 * chunks {
			write(rng.Uint64N(chunks), v)
			v++
		}
		if snap == 2 { // lookups after Open, with nothing cached
			require.NoError(t, s.Close())
			s, err = Open(origin, store, opts)
			require.NoError(t, err)
			s.pres.maxSlots = presMinSlots
			o = s.Origin()
		}
	}
	require.False(t, s.pres.zero.Load(), "the preserved-epoch cache never evicted")
	require.NoError(t, o.Flush())
	require.Equal(t, entries, s.Stats().IndexEntries, "a chunk copied twice for one snapshot, or not at all")
	verify(s)
	mustCheck(t, s)
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	verify(s)
	mustCheck(t, s)
}

// TestMetadataCacheBudget checks how Options.MetadataCache is shared: an
// eighth for the preserved epochs, the data space map's one bit per chunk
// up to an eighth, the metadata map's one bit per page, the rest for the
// node cache (at least a quarter), and that the store gives the layer
// that node cache and data map limit.
func TestMetadataCacheBudget(t *testing.T) {
	const mib = 1 << 20
	require.Equal(t, int64(64*mib-8*mib-(1<<20+1<<14)/8), nodeCacheBytes(0, 1<<20, 1<<14), "the default")
	require.Equal(t, int64(64*mib-8*mib-8*mib-(1<<18)/8), nodeCacheBytes(64*mib, 1<<30, 1<<18), "a data map past its eighth pages out")
	require.Equal(t, int64(16*mib), nodeCacheBytes(64*mib, 1<<20, 1<<32), "a metadata map above the cache: a quarter")
	require.Equal(t, int64(8*mib), presBudget(64*mib))
	require.Equal(t, int64(8*mib), dataMapBytes(0, 1<<30), "4 TiB at 4 KiB chunks: the default cache's eighth")
	require.Equal(t, int64(128*mib), dataMapBytes(2<<30, 1<<30), "4 TiB at 4 KiB chunks: 1 bit per chunk")

	opts := Options{ChunkSize: 4096, MetadataCache: 4 * mib}
	s, _, _ := newMemStore(t, 1<<20, 64<<20, opts)
	defer s.Close()
	want := nodeCacheBytes(opts.MetadataCache, s.geo.dataChunks, uint64(s.geo.metaLen)/4096)
	require.Equal(t, int(want), s.m.CacheStats().Limit)
	require.Less(t, want, opts.MetadataCache-presBudget(opts.MetadataCache))
}
