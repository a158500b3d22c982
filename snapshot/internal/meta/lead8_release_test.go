package meta

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ReleaseFrees releases a commit's frees releaseStep at a time, letting
// the lock go between steps: every chunk and page freed is released in
// the end, none twice, and a batch released in part is finished by the
// next step (here 3*releaseStep+5 chunks and the pages of the rewritten
// tree, in one durable transaction).
func TestLead8ReleaseFreesInSteps(t *testing.T) {
	const n = 3*releaseStep + 5
	dev, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 2 * n, SyncWriteBack: true})
	require.NoError(t, err)
	locs := make([]uint64, n)
	for i := range locs {
		locs[i], err = m.AllocData()
		require.NoError(t, err)
		require.NoError(t, m.Put(Key{B: 0, C: uint64(2 * i), E: 1}, locs[i]))
	}
	fz, err := m.Freeze(1, nil)
	require.NoError(t, err)
	require.NoError(t, fz.Write())
	m.ReleaseFrees()
	for i, loc := range locs {
		_, err := m.Delete(Key{B: 0, C: uint64(2 * i), E: 1})
		require.NoError(t, err)
		require.NoError(t, m.FreeData(loc))
	}
	require.EqualValues(t, n, m.DataHeld())
	fz, err = m.Freeze(2, nil)
	require.NoError(t, err)
	require.NoError(t, fz.Write())

	// One step by hand: a part of the batch, and more left.
	m.mu.Lock()
	more := m.releaseSome(releaseStep)
	m.mu.Unlock()
	require.True(t, more)
	require.Greater(t, m.DataHeld(), uint64(0))

	m.ReleaseFrees()
	require.Zero(t, m.DataHeld())
	m.mu.Lock()
	require.Empty(t, m.deferred, "every batch released and dropped")
	m.mu.Unlock()
	require.NoError(t, m.Check())
	// The chunks are free again, each once.
	for range n {
		_, err := m.AllocData()
		require.NoError(t, err)
	}
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
}

// checkCacheBooks verifies the cache's byte counts against its nodes:
// bytes is the sum of the cached nodes' costs, dirty that of the dirty
// ones, and a dirty node's recorded cost is its current cost (the writer
// keeps it so; touched and dirtied skip the lock only when it is).
func checkCacheBooks(t *testing.T, c *cache) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	var bytes, dirty int
	c.nodes.each(func(n *node) {
		require.True(t, n.inCache)
		bytes += n.cost
		if n.dirty {
			dirty += n.cost
			require.Equal(t, nodeCost(n), n.cost, "a dirty node's cost is current")
		}
	})
	require.Equal(t, bytes, c.bytes, "cache bytes")
	require.Equal(t, dirty, c.dirty, "dirty bytes")
	// The CLOCK ring holds exactly the clean cached nodes, the dirty FIFO
	// the dirty ones: eviction never walks past a dirty node.
	ring, fifo := 0, 0
	for n := c.head.next; n != &c.head; n = n.next {
		require.False(t, n.dirty, "a dirty node on the CLOCK ring")
		require.Same(t, n, c.nodes.get(n.loc), "a node on the ring is the cached one")
		ring++
	}
	for n := c.dhead.dnext; n != &c.dhead; n = n.dnext {
		require.True(t, n.dirty, "a clean node on the dirty FIFO")
		fifo++
	}
	require.Equal(t, c.nodes.len(), ring+fifo, "every cached node on the ring or the FIFO")
}

// The writer's puts into leaves it has already dirtied take no cache lock
// (settled), and the books stay exact through puts that grow leaves,
// splits, deletes, write-back and commits, with a cache small enough to
// evict.
func TestLead8SettledKeepsCacheBooks(t *testing.T) {
	dev, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 16, CacheBytes: 96 << 10})
	require.NoError(t, err)
	rng := uint64(7)
	next := func(n uint64) uint64 { rng = rng*6364136223846793005 + 1442695040888963407; return (rng >> 33) % n }
	for step := range 60000 {
		c := next(40000)
		switch next(10) {
		case 0:
			_, err := m.Delete(Key{B: 0, C: c, E: 1})
			if err != nil {
				require.ErrorIs(t, err, ErrNotFound)
			}
		default:
			err := m.Put(Key{B: 0, C: c, E: 1}, LocSpecial+1)
			if err != nil {
				require.ErrorIs(t, err, ErrExists)
			}
		}
		if step%997 == 0 {
			m.mu.Lock()
			checkCacheBooks(t, m.cache)
			m.mu.Unlock()
		}
		if step%5000 == 4999 {
			require.NoError(t, m.Commit())
			checkCacheBooks(t, m.cache)
		}
	}
	require.NoError(t, m.Commit())
	checkCacheBooks(t, m.cache)
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
}
