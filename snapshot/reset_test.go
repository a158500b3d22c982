package snapshot

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A clone reset to the snapshot it came from reads as that snapshot through
// a handle opened before, maps exactly the snapshot's store chunks (no data
// moved), keeps its own snapshots, and adds no branch. Reset to a later
// snapshot of the origin and, from a clone of a clone, to a further
// ancestor, reads as the target; unrelated snapshots are refused.
func TestResetCloneToAncestor(t *testing.T) {
	s, _, _ := newMemStore(t, 2<<20, 32<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	o := s.Origin()
	fillAt(t, o, 1, 0, 64<<10)
	g1, err := s.CreateSnapshot("g1", o)
	require.NoError(t, err)
	fillAt(t, o, 2, 32<<10, 64<<10) // g1 now maps copies of chunks 2-5
	vm, err := s.CreateClone("vm", g1)
	require.NoError(t, err)
	h, err := s.OpenVolume("vm") // the handle a connected client holds
	require.NoError(t, err)
	fillAt(t, vm, 3, 0, 256<<10)
	require.NoError(t, vm.WriteZeroes(512<<10, 128<<10))
	vms, err := s.CreateSnapshot("vms", vm)
	require.NoError(t, err)
	vmsImg := blockdevtest.ReadAll(t, vms)
	fillAt(t, vm, 4, 1<<20, 32<<10)
	branches := len(s.branches)

	require.NoError(t, s.Rollback(context.Background(), vm, g1))
	require.Equal(t, blockdevtest.ReadAll(t, g1), blockdevtest.ReadAll(t, h))
	gm, err := s.Mappings(g1)
	require.NoError(t, err)
	hm, err := s.Mappings(h)
	require.NoError(t, err)
	require.Equal(t, gm, hm, "the reset moved data")
	require.Equal(t, vmsImg, blockdevtest.ReadAll(t, vms))
	require.Equal(t, branches, len(s.branches))

	// A later snapshot of the origin: data is copied where it differs.
	fillAt(t, o, 5, 1<<20, 48<<10)
	g2, err := s.CreateSnapshot("g2", o)
	require.NoError(t, err)
	require.NoError(t, s.Rollback(context.Background(), vm, g2))
	require.Equal(t, blockdevtest.ReadAll(t, g2), blockdevtest.ReadAll(t, h))

	// A clone of a clone back to the golden snapshot two levels up.
	vm2, err := s.CreateClone("vm2", vms)
	require.NoError(t, err)
	fillAt(t, vm2, 6, 16<<10, 16<<10)
	require.NoError(t, s.Rollback(context.Background(), vm2, g1))
	require.Equal(t, blockdevtest.ReadAll(t, g1), blockdevtest.ReadAll(t, vm2))
	// ... and to its own parent snapshot.
	require.NoError(t, s.Rollback(context.Background(), vm2, vms))
	require.Equal(t, vmsImg, blockdevtest.ReadAll(t, vm2))

	// Not an ancestor: a snapshot of a sibling clone, or of a descendant.
	other, err := s.CreateClone("other", g1)
	require.NoError(t, err)
	os1, err := s.CreateSnapshot("os1", other)
	require.NoError(t, err)
	require.ErrorIs(t, s.Rollback(context.Background(), vm, os1), ErrBadOptions)
	vm2s, err := s.CreateSnapshot("vm2s", vm2)
	require.NoError(t, err)
	require.ErrorIs(t, s.Rollback(context.Background(), vm, vm2s), ErrBadOptions)
	require.NoError(t, s.Rollback(context.Background(), o, g1)) // the origin's own snapshot
	mustCheck(t, s)
}
