package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// checkSummaries verifies every branch's summaries against their
// definition: chainGroups is exactly the union of groups over the branch
// and its clone ancestors, and words a branch does not own are its
// parent's (or the empty summary, for a clone of branch 0).
func checkSummaries(t *testing.T, s *Store) {
	t.Helper()
	s.mu.RLock()
	defer s.mu.RUnlock()
	empty := s.branches[0].chainGroups
	require.False(t, slices.ContainsFunc(empty.bits, func(w uint64) bool { return w != 0 }), "the shared empty summary has bits set")
	for _, br := range s.branches {
		if br.id == 0 {
			continue
		}
		want := make([]uint64, len(empty.bits))
		for b := br; b != nil && b.id != 0; b = b.up { // a root branch has no up
			for i, w := range b.groups.bits {
				want[i] |= w
			}
		}
		require.Equal(t, want, br.chainGroups.bits, "branch %d: chain summary", br.id)
		if !br.ownGroups {
			require.Same(t, &empty.bits[0], &br.groups.bits[0], "branch %d: unowned groups", br.id)
		}
		if !br.ownChain {
			shared := empty
			if br.up != nil && br.up.id != 0 {
				shared = br.up.chainGroups
			}
			require.Same(t, &shared.bits[0], &br.chainGroups.bits[0], "branch %d: unowned chain summary", br.id)
		}
		require.Len(t, levelsOf(br, epochLive), br.depth+1, "branch %d", br.id)
	}
}

// TestCloneTreeSummaries builds a random tree of clones and writes to
// random volumes of it (the origin too), checking after each step the
// summaries that let reads skip clone levels, and at the end every volume
// against a model.
func TestCloneTreeSummaries(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 3))
	const cs = 4 << 10
	// 2 MiB at 4 KiB chunks: 512 chunks, one group each.
	s, origin, _ := newMemStore(t, 2<<20, 16<<20, Options{ChunkSize: cs})
	vols := []*Volume{s.Origin()}
	models := [][]byte{make([]byte, origin.Size())}
	_, err := vols[0].ReadAt(models[0], 0)
	require.NoError(t, err)
	p := make([]byte, 2*cs)
	for step := range 120 {
		if rng.IntN(3) == 0 {
			from := rng.IntN(len(vols))
			c, err := s.CreateClone(fmt.Sprintf("c%d", step), vols[from])
			require.NoError(t, err)
			vols, models = append(vols, c), append(models, bytes.Clone(models[from]))
		} else {
			i := rng.IntN(len(vols))
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			n := int64(cs * (1 + rng.IntN(2)))
			off := rng.Int64N(origin.Size()/cs-1) * cs
			_, err := vols[i].WriteAt(p[:n], off)
			require.NoError(t, err)
			copy(models[i][off:], p[:n])
		}
		checkSummaries(t, s)
	}
	got := make([]byte, origin.Size())
	for i, v := range vols {
		_, err := v.ReadAt(got, 0)
		require.NoError(t, err)
		require.True(t, bytes.Equal(models[i], got), "volume %d (%s)", i, v.meta.name)
	}
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Check())
}

// TestDeepCloneChainReopens: a chain deeper than readCurrent's stack room,
// written at the top (a partial write reads the chain below), survives a
// reopen with its summaries rebuilt from the metadata.
func TestDeepCloneChainReopens(t *testing.T) {
	const cs, depth = 4 << 10, 40
	origin, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 1)
	store, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	s, err := Format(origin, store, Options{ChunkSize: cs})
	require.NoError(t, err)
	want := make([]byte, origin.Size())
	_, err = origin.ReadAt(want, 0)
	require.NoError(t, err)
	v := s.Origin()
	for d := range depth {
		v, err = s.CreateClone(fmt.Sprintf("c%d", d), v)
		require.NoError(t, err)
		if d == depth/2 { // a level in the middle has data
			_, err = v.WriteAt(bytes.Repeat([]byte{0x5a}, cs), 3*cs)
			require.NoError(t, err)
			copy(want[3*cs:], bytes.Repeat([]byte{0x5a}, cs))
		}
	}
	_, err = v.WriteAt(bytes.Repeat([]byte{0xa5}, 512), 3*cs+512) // partial: reads the chain
	require.NoError(t, err)
	copy(want[3*cs+512:], bytes.Repeat([]byte{0xa5}, 512))
	checkSummaries(t, s)
	require.NoError(t, s.Close())

	s, err = Open(origin, store, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	checkSummaries(t, s)
	v, err = s.OpenVolume(fmt.Sprintf("c%d", depth-1))
	require.NoError(t, err)
	got := make([]byte, origin.Size())
	_, err = v.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got))
	require.NoError(t, s.Check())
}

// BenchmarkCloneChainHeap: the heap a chain of D clones (each a clone of
// the one before, from the origin) adds to a store of a 4 GiB origin at
// 4 KiB chunks (1M chunks: the largest summaries), with no writes, or
// with one 4 KiB write at every level (each to a new summary group, so
// every level owns its summaries). heap-MiB is the growth of live heap
// after GC; B/level is that over D. One iteration is the whole run: use
// -benchtime 1x.
func BenchmarkCloneChainHeap(b *testing.B) {
	for _, depth := range []int{1000, 10000} {
		for _, writes := range []string{"none", "each"} {
			b.Run(fmt.Sprintf("depth=%d/writes=%s", depth, writes), func(b *testing.B) {
				for range b.N {
					cloneChainHeap(b, depth, writes == "each")
				}
			})
		}
	}
}

func cloneChainHeap(b *testing.B, depth int, write bool) {
	const size, cs = 4 << 30, 4 << 10
	origin, err := blockdev.NewMem(size, 4096)
	require.NoError(b, err)
	store, err := blockdev.NewMem(1<<30, 4096)
	require.NoError(b, err)
	s, err := Format(origin, store, Options{ChunkSize: cs, Transient: true})
	require.NoError(b, err)
	defer s.Close()
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	v := s.Origin()
	buf := make([]byte, cs)
	chunks := int64(size / cs)
	for d := range depth {
		v, err = s.CreateClone(fmt.Sprintf("c%d", d), v)
		require.NoError(b, err)
		if write {
			// 16 chunks a group at 1M chunks: stride past a group each level.
			_, err = v.WriteAt(buf, (int64(d)*17%chunks)*cs)
			require.NoError(b, err)
		}
	}
	grown := float64(heap()) - float64(before)
	runtime.KeepAlive(v)
	b.ReportMetric(grown/(1<<20), "heap-MiB")
	b.ReportMetric(grown/float64(depth), "B/level")
}
