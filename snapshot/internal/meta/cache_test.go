package meta

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// testNodes makes n clean leaves at pages 0..n-1, each of one cost.
func testNodes(n int) []*node {
	out := make([]*node, n)
	for i := range out {
		out[i] = &node{loc: uint64(i), tx: 1, runs: make([]run, 0, 4)}
	}
	return out
}

// TestCacheClock: eviction drops the coldest clean nodes that no lookup
// referenced since the last sweep, spares referenced ones once, never
// drops a dirty one, and ends when nothing can be dropped.
func TestCacheClock(t *testing.T) {
	nodes := testNodes(6)
	cost := nodeCost(nodes[0])
	c := newCache(6 * cost)
	for _, n := range nodes {
		require.Same(t, n, c.add(n))
	}
	// Inserted 0..5: 0 is the coldest. 1 and 3 are looked up, 2 is dirty.
	require.Same(t, nodes[1], c.get(1))
	require.Same(t, nodes[3], c.get(3))
	c.setDirty(nodes[2], true)
	c.limit = 4 * cost
	c.evict()
	// Two must go: 0 (the coldest), then 1 and 3 lose their bit and 2
	// (dirty) goes round, and 4 goes; 5, the hottest, is not reached.
	require.NotSame(t, nodes[2], c.head.prev, "the dirty node stayed at the cold end, where every eviction walks past it again")
	for loc, want := range []bool{false, true, true, true, false, true} {
		require.Equal(t, want, c.get(uint64(loc)) != nil, "page %d", loc)
	}
	require.Equal(t, uint64(2), c.stats().Evicted)

	// Nothing but dirty nodes over the limit: the walk ends, nothing goes.
	d := newCache(cost)
	for _, n := range testNodes(4) {
		n.dirty = true
		d.add(n)
	}
	d.evict()
	require.Equal(t, 4, d.stats().Nodes)
	require.Equal(t, uint64(0), d.stats().Evicted)
}
