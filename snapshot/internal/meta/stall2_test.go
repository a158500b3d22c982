package meta

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// stall2Layer formats a layer of 20,000 keys spread over 2^30 chunks
// (about 55 leaves), commits it and opens it again on a device that
// counts page reads, with an empty cache.
func stall2Layer(t *testing.T, rng *rand.Rand) (*Meta, *readCounter) {
	t.Helper()
	mem, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(mem, Options{DataChunks: 1 << 16})
	require.NoError(t, err)
	for i := range 20000 {
		_, err := m.PutData(Key{C: uint64(i)*53600 + rng.Uint64N(53600), E: 1})
		require.NoError(t, err)
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())
	dev := &readCounter{Device: mem}
	m, err = Open(dev, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	return m, dev
}

// stall2EvictAll drops every clean, unpinned node from m's cache.
func stall2EvictAll(m *Meta) {
	m.cache.mu.Lock()
	limit := m.cache.limit
	m.cache.limit = 0
	m.cache.evictLocked()
	m.cache.limit = limit
	m.cache.mu.Unlock()
}

// TestStall2PutReadsOnlyItsPath: a Put of a new key past the last run of
// its leaf reads no page once both trees' paths to it are cached. Its
// existence check stepped to the next leaf, as Seek does, and so read a
// page the caller's check (PinPaths, Prefetch) had not loaded: under the
// store's lock, in about one random put in 370.
func TestStall2PutReadsOnlyItsPath(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 9))
	m, dev := stall2Layer(t, rng)
	// The last run of the root's first child: the next key after it lies
	// in the second leaf.
	root, err := m.load(m.chunk.root, chunkTree, int(m.chunk.level))
	require.NoError(t, err)
	require.False(t, root.leaf(), "one leaf: the test proves nothing")
	leaf, err := m.load(root.kids[0], chunkTree, int(root.level)-1)
	require.NoError(t, err)
	for !leaf.leaf() {
		leaf, err = m.load(leaf.kids[0], chunkTree, int(leaf.level)-1)
		require.NoError(t, err)
	}
	last := leaf.runs[len(leaf.runs)-1]
	q := Key{B: last.b, C: last.c + uint64(last.n), E: last.e}

	stall2EvictAll(m)
	require.NoError(t, m.Prefetch(q))
	var p Pins
	require.True(t, m.PinPaths(q, &p))
	defer p.Unpin()
	reads, missed := dev.reads.Load(), m.Stalls().ChangesMissed
	require.NoError(t, m.Put(q, 5))
	require.Equal(t, reads, dev.reads.Load(), "a Put of a key past its leaf's last run read a page")
	require.Equal(t, missed, m.Stalls().ChangesMissed)
	loc, ok, err := m.Get(q)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, uint64(5), loc)
	require.ErrorIs(t, m.Put(q, 6), ErrExists)
}

// TestStall2PinnedPathsSurviveEviction: the paths PinPaths found cached
// stay cached, however much the cache evicts meanwhile, until Unpin; so
// the Put that follows reads no page. Without the pins (what a check
// that only looked, PathsCached, left) the same eviction makes it read.
func TestStall2PinnedPathsSurviveEviction(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 10))
	m, dev := stall2Layer(t, rng)
	key := func() Key { return Key{C: rng.Uint64N(1<<30) | 1, E: 2} }

	q := key()
	require.NoError(t, m.Prefetch(q))
	var p Pins
	require.True(t, m.PinPaths(q, &p))
	require.NotEmpty(t, p.nodes)
	stall2EvictAll(m)
	reads := dev.reads.Load()
	require.NoError(t, m.Put(q, 5))
	require.Equal(t, reads, dev.reads.Load(), "a Put of a pinned key read a page after eviction")
	p.Unpin()
	require.Empty(t, p.nodes)

	// The same without pins: the eviction costs the Put page reads.
	q2 := key()
	require.NoError(t, m.Prefetch(q2))
	stall2EvictAll(m)
	require.False(t, m.PinPaths(q2, &p), "an evicted path reported cached")
	require.Empty(t, p.nodes, "a failed PinPaths left pins")
	reads = dev.reads.Load()
	require.NoError(t, m.Put(q2, 6))
	require.Greater(t, dev.reads.Load(), reads, "the unpinned Put read nothing: the test proves nothing")

	// Unpinned nodes are evictable again.
	require.NoError(t, m.Commit())
	stall2EvictAll(m)
	require.Zero(t, m.CacheStats().Nodes, "unpinned nodes stayed cached")
}

// TestStall2JoinReadsNoPage: deletes that empty a leaf make it underfull,
// and the change then joins it with a sibling (rebalance), reading the
// sibling. After Prefetch and PinPaths of the key, however much the cache
// evicts meanwhile, none of those deletes reads a page: Prefetch loads
// and PinPaths pins the siblings a rebalance on the path may join
// (mayJoin). Without that, the sibling was read under the caller's lock.
func TestStall2JoinReadsNoPage(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 11))
	m, dev := stall2Layer(t, rng)
	root, err := m.load(m.chunk.root, chunkTree, int(m.chunk.level))
	require.NoError(t, err)
	require.False(t, root.leaf(), "one leaf: the test proves nothing")
	n := root
	for !n.leaf() {
		n, err = m.load(n.kids[0], chunkTree, int(n.level)-1)
		require.NoError(t, err)
	}
	var keys []Key
	for _, r := range n.runs {
		for i := range uint64(r.n) {
			y := chunkTree.at(r, i)
			keys = append(keys, Key{B: y.b, C: y.c, E: y.e})
		}
	}
	require.NotEmpty(t, keys)
	for _, q := range keys {
		stall2EvictAll(m)
		require.NoError(t, m.Prefetch(q))
		var p Pins
		require.True(t, m.PinPaths(q, &p))
		stall2EvictAll(m)
		reads := dev.reads.Load()
		loc, err := m.Delete(q)
		require.NoError(t, err)
		require.Equal(t, reads, dev.reads.Load(), "a Delete read a page after Prefetch and PinPaths")
		p.Unpin()
		require.NoError(t, m.FreeData(loc))
		require.NoError(t, m.Commit())
	}
	require.Equal(t, uint64(20000-len(keys)), m.Len())
	require.NoError(t, m.Check())
}

// TestStall2PrefetchPinUnderPressure: in a cache too small for both
// trees' paths at once, a node Prefetch loaded was evicted by the next
// node it added, so the caller's check under its own lock (PinPaths)
// kept failing, and after its retries the change read under that lock.
// PrefetchPin pins each node in the same hold of the cache's lock that
// finds or adds it, so the check that follows passes and the change reads
// no page. (Pinning each walk's nodes once the walk ended still failed
// here: the walk's own next add evicted the node before it.)
func TestStall2PrefetchPinUnderPressure(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 12))
	m, dev := stall2Layer(t, rng)
	key := func() Key { return Key{C: rng.Uint64N(1<<30) | 1, E: 2} }
	// Room for about two nodes, fewer than both trees' paths: each add
	// evicts every clean, unpinned node it can.
	require.NoError(t, m.Prefetch(key()))
	m.cache.mu.Lock()
	m.cache.limit = 2 * m.cache.bytes / max(m.cache.nodes.len(), 1)
	m.cache.mu.Unlock()

	failed := 0
	for range 20 {
		var p Pins
		q := key()
		m.prefetch.Store(prefetchWindow)
		require.NoError(t, m.Prefetch(q))
		if !m.PinPaths(q, &p) {
			failed++
		}
		p.Unpin()
	}
	require.Positive(t, failed, "Prefetch then PinPaths always passed: the test proves nothing")

	for range 20 {
		var p Pins
		q := key()
		m.prefetch.Store(prefetchWindow)
		require.NoError(t, m.PrefetchPin(q, &p))
		require.True(t, m.PinPaths(q, &p), "a path PrefetchPin loaded was not cached")
		reads := dev.reads.Load()
		require.NoError(t, m.Put(q, 5))
		require.Equal(t, reads, dev.reads.Load(), "a Put after PrefetchPin read a page")
		p.Unpin()
		require.NoError(t, m.Commit()) // its nodes clean again: evictable
	}
}
