package meta

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// insertRun and deleteRun, which move the shorter side of a leaf and keep
// front room, against slices.Insert and slices.Delete; the cache cost
// counts the front room.
func TestInsertDeleteRunShorterSide(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 13))
	n := &node{runs: make([]run, 0, 8)}
	var want []run
	fronts := 0
	for step := range 20000 {
		// Grow to about 700 runs, then shrink and grow again.
		grow := step%6000 < 4000
		if len(want) == 0 || grow && rng.IntN(4) != 0 || !grow && rng.IntN(4) == 0 {
			i := rng.IntN(len(want) + 1)
			r := run{b: uint32(step), c: rng.Uint64(), n: 1}
			insertRun(n, i, r)
			want = slices.Insert(want, i, r)
		} else {
			i := rng.IntN(len(want))
			deleteRun(n, i)
			want = slices.Delete(want, i, i+1)
		}
		if !slices.Equal(want, n.runs) {
			require.Equal(t, want, n.runs, "step %d", step)
		}
		if n.frontRoom() > 0 {
			fronts++
		}
		if n.backing() < cap(n.runs) || nodeCost(n) != nodeOverhead+n.backing()*32 {
			require.Failf(t, "cost", "step %d: backing %d, cap %d, cost %d", step, n.backing(), cap(n.runs), nodeCost(n))
		}
	}
	require.Positive(t, fronts, "front room was used")
	// A reallocation elsewhere leaves base stale: no front room then.
	n.runs = append([]run(nil), n.runs...)
	require.Zero(t, n.frontRoom())
	require.Equal(t, cap(n.runs), n.backing())
}

// A put that extends a run in either direction, or joins two, changes
// the leaf in place: the runs merge as if inserted one by one.
func TestPutMergesNeighbours(t *testing.T) {
	dev, err := blockdev.NewMem(1<<10*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 1 << 20})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	for _, c := range []uint64{10, 12, 11, 9, 13, 20, 30, 21, 29, 22, 28} {
		require.NoError(t, m.Put(Key{C: c, E: 1}, 1000+c))
	}
	require.Zero(t, m.chunk.level, "one leaf")
	leaf, err := m.load(m.chunk.root, chunkTree, 0)
	require.NoError(t, err)
	require.Equal(t, []run{
		{c: 9, e: 1, n: 5, loc: 1009},
		{c: 20, e: 1, n: 3, loc: 1020},
		{c: 28, e: 1, n: 3, loc: 1028},
	}, leaf.runs)
	require.Equal(t, chunkTree.leafSize(leaf.runs), leaf.size)
	require.EqualValues(t, 3, m.chunk.runs)
	for _, c := range []uint64{9, 11, 13, 20, 22, 28, 30} {
		loc, ok, err := m.Get(Key{C: c, E: 1})
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, 1000+c, loc)
	}
	require.NoError(t, m.Check())
}
