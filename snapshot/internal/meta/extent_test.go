package meta

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// extentRegion is a 256-page region at the start of an outer device whose
// data region (64 chunks of 64 KiB, 16 pages each) follows it.
func extentRegion(t *testing.T) (*blockdev.Mem, blockdev.Device, Options) {
	outer, err := blockdev.NewMem(256*PageSize+64*64<<10, 4096)
	require.NoError(t, err)
	dev, err := blockdev.Slice(outer, 0, 256*PageSize)
	require.NoError(t, err)
	return outer, dev, Options{DataChunks: 64, Outer: outer, DataOff: 256 * PageSize, ChunkBytes: 64 << 10, CacheBytes: 256 << 10}
}

// putUntilFull puts random zero-location keys until the region refuses
// one, and returns them.
func putUntilFull(t *testing.T, m *Meta, rng *rand.Rand) []Key {
	var keys []Key
	for {
		k := Key{B: 1, C: rng.Uint64N(1 << 30), E: 1}
		if _, ok, err := m.Get(k); err != nil || ok {
			require.NoError(t, err)
			continue
		}
		err := m.Put(k, 1<<63)
		if errors.Is(err, ErrNoSpace) {
			return keys
		}
		require.NoError(t, err)
		keys = append(keys, k)
	}
}

// A full region grows into the highest free data chunks: the keys go on,
// the chunks are in use but not data (DataInUse, Check), the layout
// survives a reopen, and a region that grew cannot open without its outer
// device.
func TestGrowFromData(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 1))
	_, dev, opts := extentRegion(t)
	m, err := Format(dev, opts)
	require.NoError(t, err)
	loc, err := m.AllocData()
	require.NoError(t, err)
	require.NoError(t, m.Put(Key{B: 2, C: 1, E: 1}, loc))
	keys := append(putUntilFull(t, m, rng), Key{B: 2, C: 1, E: 1})
	require.NoError(t, m.Commit())

	first, err := m.GrowFromData(2)
	require.NoError(t, err)
	require.EqualValues(t, 62, first)
	sp := m.Space()
	require.EqualValues(t, 256+32, sp.Pages)
	require.EqualValues(t, 2, sp.ChunksMeta)
	require.EqualValues(t, 3, sp.ChunksUsed)
	var data []uint64
	require.NoError(t, m.DataInUse(func(l uint64) bool { data = append(data, l); return true }))
	require.Equal(t, []uint64{loc}, data)
	more := putUntilFull(t, m, rng)
	require.NotEmpty(t, more)
	keys = append(keys, more...)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	_, err = m.GrowFromData(200)
	require.ErrorIs(t, err, ErrNoSpace)
	require.NoError(t, m.Close())

	m, err = Open(dev, opts)
	require.NoError(t, err)
	require.NoError(t, m.Check())
	for _, k := range keys {
		_, ok, err := m.Get(k)
		require.NoError(t, err)
		require.True(t, ok, "key %v", k)
	}
	first, err = m.GrowFromData(3) // a second extent, below the first
	require.NoError(t, err)
	require.EqualValues(t, 59, first)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())

	bare := opts
	bare.Outer = nil
	_, err = Open(dev, bare)
	require.ErrorIs(t, err, ErrInvalid)
	m, err = Open(dev, opts)
	require.NoError(t, err)
	require.EqualValues(t, 256+32+48, m.Space().Pages)
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
}

// freeRunFromTop skips bits in use and held bits.
func TestFreeRunFromTop(t *testing.T) {
	s := newSpaceMap(200)
	s.set(199)
	s.hold(190)
	for _, c := range []struct{ n, first uint64 }{{1, 198}, {8, 191}, {9, 181}, {190, 0}} {
		got, ok, err := s.freeRunFromTop(c.n)
		require.NoError(t, err)
		require.True(t, ok, "run of %d", c.n)
		require.Equal(t, c.first, got, "run of %d", c.n)
	}
	_, ok, err := s.freeRunFromTop(191)
	require.NoError(t, err)
	require.False(t, ok)
}
