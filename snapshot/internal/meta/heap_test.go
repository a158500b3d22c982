package meta

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// heapFill puts n keys at pseudo-random chunks below span (one data chunk
// each, epoch 1) and returns what it put.
func heapFill(t *testing.T, m *Meta, rng *rand.Rand, n int, span uint64, want map[uint64]uint64, each func()) {
	t.Helper()
	for range n {
		c := rng.Uint64N(span)
		if _, ok := want[c]; ok {
			continue
		}
		require.NoError(t, m.Throttle())
		loc, err := m.PutData(Key{C: c, E: 1})
		require.NoError(t, err)
		want[c] = loc
		if each != nil {
			each()
		}
	}
}

func heapVerify(t *testing.T, m *Meta, want map[uint64]uint64) {
	t.Helper()
	for c, loc := range want {
		got, ok, err := m.Get(Key{C: c, E: 1})
		require.NoError(t, err)
		require.True(t, ok, "chunk %d lost", c)
		require.Equal(t, loc, got, "chunk %d", c)
	}
}

// TestHeapCommitWritesInBatches: a commit of many dirty nodes encodes them
// commitBatch at a time into one reused buffer, so what the layer keeps
// after it is that buffer and the map pages, not a page per node (the old
// commit kept every page it wrote: a quarter of the cache after a large
// one); and what it wrote reads back after a reopen.
func TestHeapCommitWritesInBatches(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	dev, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	opts := Options{DataChunks: 1 << 18, CacheBytes: 32 << 20}
	m, err := Format(dev, opts)
	require.NoError(t, err)
	want := make(map[uint64]uint64)
	heapFill(t, m, rng, 60_000, 1<<30, want, nil)
	dirty := m.CacheStats().DirtyBytes
	require.NoError(t, m.Commit())
	st := m.CommitStats()
	require.Greater(t, st.Pages, uint64(3*commitBatch), "the commit wrote too few pages to span batches (dirty %d bytes)", dirty)
	m.commitMu.Lock()
	batch, kept := len(m.commitBatch), cap(m.commitBuf)
	m.commitMu.Unlock()
	require.Equal(t, commitBatch*PageSize, batch)
	require.LessOrEqual(t, kept, 16*PageSize, "the commit kept %d bytes of pages after writing %d", kept, st.Pages)
	heapVerify(t, m, want)
	require.NoError(t, m.Close())

	m, err = Open(dev, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	heapVerify(t, m, want)
}

// TestHeapFrozenNodesWithinCache: while a large commit is frozen and not
// yet written (its nodes pinned), the open transaction's write-back
// starts from what the frozen nodes leave of the cache, so the dirty
// nodes of both stay within the cache's limit. Before, the open
// transaction had half and three quarters of the whole limit to itself,
// and the two together went past it by up to the frozen commit's size.
func TestHeapFrozenNodesWithinCache(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	dev, err := blockdev.NewMem(16384*PageSize, 4096)
	require.NoError(t, err)
	const limit = 4 << 20
	opts := Options{DataChunks: 1 << 19, CacheBytes: limit}
	m, err := Format(dev, opts)
	require.NoError(t, err)
	want := make(map[uint64]uint64)
	// Enough random keys that the open transaction's dirty nodes reach
	// write-back's half of the cache.
	heapFill(t, m, rng, 100_000, 1<<30, want, nil)
	f, err := m.Freeze(0, nil)
	require.NoError(t, err)
	require.NotNil(t, f)
	m.mu.Lock()
	frozen := m.frozenBytes
	m.mu.Unlock()
	require.Greater(t, frozen, limit/3, "the frozen commit is too small to test the bound")
	// Every change now shadows a frozen leaf into the open transaction.
	worst := 0
	heapFill(t, m, rng, 20_000, 1<<30, want, func() {
		worst = max(worst, m.CacheStats().DirtyBytes)
	})
	t.Logf("frozen %d bytes, worst dirty %d bytes, limit %d", frozen, worst, limit)
	require.LessOrEqual(t, worst, limit, "dirty nodes (frozen %d bytes) went past the cache's limit", frozen)
	require.NoError(t, f.Write())
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())

	m, err = Open(dev, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	heapVerify(t, m, want)
}

// TestHeapCommitKeepsNoLargeMapBuffer: a commit that wrote more space-map
// pages than a batch (the first one after Format writes every bitmap page
// of the data map: 256 here) does not keep them in memory for the next
// commit; the old code kept its commit buffer at its largest.
func TestHeapCommitKeepsNoLargeMapBuffer(t *testing.T) {
	dev, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 23, CacheBytes: 4 << 20})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	_, err = m.PutData(Key{C: 1, E: 1})
	require.NoError(t, err)
	require.NoError(t, m.Commit())
	m.commitMu.Lock()
	kept := cap(m.commitBuf)
	m.commitMu.Unlock()
	require.LessOrEqual(t, kept, commitBatch*PageSize)
}
