package meta

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// readCounter counts the page reads that reach the device.
type readCounter struct {
	blockdev.Device
	reads atomic.Int64
}

func (d *readCounter) ReadAt(p []byte, off int64) (int, error) {
	d.reads.Add(1)
	return d.Device.ReadAt(p, off)
}

// TestPrefetch: after Prefetch of a key, a Put and a Delete of that key
// read no page (the store prefetches before it takes its own lock, so
// that its changes read none under it), while a Put of a key whose leaves
// were not prefetched does; Prefetch changes nothing; it turns itself off
// after a window of prefetches that all hit, and on when a change reads.
func TestPrefetch(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 8))
	mem, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(mem, Options{DataChunks: 1 << 16})
	require.NoError(t, err)
	for i := range 20000 {
		_, err := m.PutData(Key{C: uint64(i)*53600 + rng.Uint64N(53600), E: 1}) // distinct, spread over 2^30
		require.NoError(t, err)
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())

	dev := &readCounter{Device: mem}
	m, err = Open(dev, Options{})
	require.NoError(t, err)
	defer m.Close()
	before := m.Stats()
	q := Key{C: rng.Uint64N(1<<30) | 1, E: 2}
	require.NoError(t, m.Prefetch(q))
	require.Equal(t, before, m.Stats(), "Prefetch changed the trees")
	require.Equal(t, uint64(20000), m.Len())
	reads := dev.reads.Load()
	require.Positive(t, reads, "Prefetch read nothing on a cold cache")
	require.NoError(t, m.Put(q, 7))
	require.Equal(t, reads, dev.reads.Load(), "Put of a prefetched key read pages")
	loc, err := m.Delete(q)
	require.NoError(t, err)
	require.Equal(t, uint64(7), loc)
	require.Equal(t, reads, dev.reads.Load(), "Delete of a prefetched key read pages")

	// A key half the key space away, in a leaf not read yet, costs reads
	// without a prefetch.
	reads = dev.reads.Load()
	require.NoError(t, m.Put(Key{C: q.C ^ 1<<29, E: 2}, 9))
	require.Greater(t, dev.reads.Load(), reads, "a Put of a key not prefetched read nothing: the test proves nothing")

	// Prefetches that all hit turn prefetching off within a window...
	for range prefetchWindow {
		require.NoError(t, m.Prefetch(q))
	}
	reads = dev.reads.Load()
	require.NoError(t, m.Prefetch(Key{C: q.C ^ 1<<28, E: 2}))
	require.Equal(t, reads, dev.reads.Load(), "Prefetch still reads after a window of prefetches that all hit")
	// ... and a change that reads a page turns it back on.
	require.NoError(t, m.Put(Key{C: q.C ^ 1<<28, E: 2}, 10))
	require.Greater(t, dev.reads.Load(), reads, "the Put read nothing: the test proves nothing")
	reads = dev.reads.Load()
	require.NoError(t, m.Prefetch(Key{C: q.C ^ 1<<27, E: 2}))
	require.Greater(t, dev.reads.Load(), reads, "Prefetch stayed off after a change read a page")
}
