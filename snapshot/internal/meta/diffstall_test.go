package meta

import (
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// diffstallLayer formats a layer of 20,000 committed keys spread over
// 2^30 chunks (about 55 leaves), writing back in the writer's calls, then
// puts n more keys in the open transaction, writes every dirty node back
// (clean, but still of the open transaction) and empties the cache: the
// state a scan beside a writer leaves, where the write-back has cleaned
// the open transaction's nodes and the scan's reads evicted them. It
// returns the keys put in the open transaction.
func diffstallLayer(t *testing.T, rng *rand.Rand, dev blockdev.Device, n int) (*Meta, []Key) {
	t.Helper()
	m, err := Format(dev, Options{DataChunks: 1 << 16, SyncWriteBack: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	for i := range 20000 {
		_, err := m.PutData(Key{C: uint64(i)*53600 + rng.Uint64N(53600), E: 1})
		require.NoError(t, err)
	}
	require.NoError(t, m.Commit())
	keys := make([]Key, 0, n)
	for range n {
		q := Key{C: rng.Uint64N(1<<30) | 1, E: 2}
		if _, err := m.PutData(q); err == nil {
			keys = append(keys, q)
		}
	}
	diffstallWriteOut(t, m)
	stall2EvictAll(m)
	require.Zero(t, m.CacheStats().Nodes, "nodes stayed cached")
	return m, keys
}

// diffstallWriteOut writes every dirty node of the open transaction back,
// as the write-back does, leaving them clean.
func diffstallWriteOut(t *testing.T, m *Meta) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	require.NoError(t, m.writeNodes(1<<30))
	require.Zero(t, m.openDirty(), "dirty nodes left")
}

// TestDiffstallOpenTxPagesReadUnlocked: lookups (Get, and PrefetchPin as
// the store's writer calls it before each change) of keys whose paths are
// nodes of the open transaction, written back and evicted, read those
// pages without the layer's lock. The old code read every such page
// twice, the second time under the lock, where each change waited for it
// (the writer's stall during Diff at 1M versions: about 24,000 pages read
// under the lock in one Diff). It counts reads (Stalls.LockedReads), not
// time.
func TestDiffstallOpenTxPagesReadUnlocked(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 13))
	mem, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	dev := &readCounter{Device: mem}
	m, keys := diffstallLayer(t, rng, dev, 300)
	require.Greater(t, m.chunk.root.tx, m.durable, "the root is not of the open transaction: the test proves nothing")
	m.ResetStalls()
	reads := dev.reads.Load()
	for i, q := range keys {
		if i%2 == 0 {
			loc, ok, err := m.Get(q)
			require.NoError(t, err)
			require.True(t, ok)
			require.NotZero(t, loc)
			continue
		}
		var p Pins
		m.prefetch.Store(prefetchWindow)
		require.NoError(t, m.PrefetchPin(q, &p))
		require.True(t, m.PinPaths(q, &p), "a path PrefetchPin loaded was not cached")
		p.Unpin()
		stall2EvictAll(m)
	}
	read := dev.reads.Load() - reads
	t.Logf("%d lookups read %d pages, %d of them under the layer's lock", len(keys), read, m.Stalls().LockedReads)
	require.Greater(t, read, int64(len(keys)), "the lookups read few pages: the test proves nothing")
	require.Zero(t, m.Stalls().LockedReads, "pages of the open transaction read under the layer's lock")
}

// diffstallStaleGate, once armed for a page, reads it, then signals
// entered and waits for open before it returns what it read: the page as
// it was when the read began, however it was written meanwhile.
type diffstallStaleGate struct {
	blockdev.Device
	at      atomic.Int64 // the byte offset of the page to hold (-1: none)
	entered chan struct{}
	open    chan struct{}
}

func (d *diffstallStaleGate) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.Device.ReadAt(p, off)
	if d.at.CompareAndSwap(off, -1) {
		close(d.entered)
		<-d.open
	}
	return n, err
}

// TestDiffstallOpenTxPageRewrittenDuringRead: a lookup reads a leaf of the
// open transaction without the lock; while the read is held in the device
// (with the page's old contents), the writer puts a key into that leaf in
// place, writes it back and the cache evicts it. The lookup must not use
// what it read: it looks for the new key and finds it. Accepting every
// page of the open transaction read unlocked, without openUnwritten's
// check, returns the stale leaf, and the key is not found. (The old code
// read the leaf under the lock, and the change waited for it: the hang
// guard fails it after a minute.)
func TestDiffstallOpenTxPageRewrittenDuringRead(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 14))
	mem, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	dev := &diffstallStaleGate{Device: mem}
	dev.at.Store(-1)
	m, keys := diffstallLayer(t, rng, dev, 300)
	// A key next to one put in the open transaction: same leaf, which
	// that put shadowed (of the open transaction, so changed in place).
	var q Key
	var leafLoc uint64
	m.mu.Lock()
	for _, k := range keys {
		q = Key{C: k.C + 2, E: 2}
		r := m.reader()
		it := r.iter(chunkTree)
		require.True(t, it.seek(r.chunk, q.run(0)))
		leaf := it.nodes[len(it.nodes)-1]
		if _, ok, err := r.get(q); err == nil && !ok && leaf.tx == m.tx {
			leafLoc = leaf.loc
			break
		}
	}
	m.mu.Unlock()
	require.NotZero(t, leafLoc, "no leaf of the open transaction: the test proves nothing")
	stall2EvictAll(m)

	dev.entered, dev.open = make(chan struct{}), make(chan struct{})
	dev.at.Store(int64(leafLoc) * PageSize)
	got := make(chan error, 1)
	go func() {
		loc, ok, err := m.Get(q)
		if err == nil && (!ok || loc != 77) {
			err = fmt.Errorf("Get %v: %d %v, want 77: a stale leaf was used", q, loc, ok)
		}
		got <- err
	}()
	stallHangGuard(t, dev.entered, "the lookup's read of the leaf")
	// The change goes ahead while the lookup's read is held (the old code
	// read the open transaction's pages under the lock: it waited here).
	changed := make(chan struct{})
	var putErr error
	go func() {
		defer close(changed)
		if putErr = m.Put(q, 77); putErr != nil {
			return
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		putErr = m.writeNodes(1 << 30)
	}()
	stallHangGuard(t, changed, "a change while a lookup reads")
	require.NoError(t, putErr)
	stall2EvictAll(m)
	close(dev.open)
	require.NoError(t, <-got)
}
