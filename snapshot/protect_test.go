package snapshot

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// golden <- vm1 (with snapshot vm1s <- vm1c) and vm2: the tree the
// protection tests delete from.
func protectTree(t *testing.T) *Store {
	t.Helper()
	s, _, _ := newMemStore(t, 2<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	vm1, err := s.CreateClone("vm1", g)
	require.NoError(t, err)
	fillAt(t, vm1, 1, 0, 64<<10)
	vm1s, err := s.CreateSnapshot("vm1s", vm1)
	require.NoError(t, err)
	_, err = s.CreateClone("vm1c", vm1s)
	require.NoError(t, err)
	_, err = s.CreateClone("vm2", g)
	require.NoError(t, err)
	return s
}

func names(vs []VolumeInfo) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.Name)
	}
	return out
}

// A protected snapshot refuses every kind of delete, naming its
// dependants; protection survives a reopen (from the checkpoint and from
// the journal) and Unprotect lifts it.
func TestProtectRefusesDelete(t *testing.T) {
	s, origin, store := newMemStore(t, 2<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	g, err := s.CreateSnapshot("golden", s.Origin())
	require.NoError(t, err)
	_, err = s.CreateClone("vm", g)
	require.NoError(t, err)
	require.NoError(t, s.Protect("golden"))
	require.NoError(t, s.Protect("golden")) // idempotent
	require.True(t, g.Info().Protected)
	for _, opts := range []DeleteOptions{{}, {Detach: true}, {Recursive: true}} {
		_, err = s.DeleteWith("golden", opts)
		var de *DependantsError
		require.ErrorAs(t, err, &de, "%+v", opts)
		require.ErrorIs(t, err, ErrProtected)
		require.Equal(t, []string{"vm"}, de.Dependants)
		require.Equal(t, "golden", de.Blocker)
	}
	_, err = s.Delete("golden")
	require.ErrorIs(t, err, ErrProtected)
	require.ErrorContains(t, err, `"golden" is protected (dependants: vm)`)

	require.ErrorIs(t, s.Protect("origin"), ErrBadOptions)
	require.ErrorIs(t, s.Protect("nope"), ErrNotFound)
	require.NoError(t, s.Protect("vm"))
	_, err = s.Delete("vm")
	require.ErrorIs(t, err, ErrProtected)

	// From the checkpoint Close writes.
	require.NoError(t, s.Close())
	s, err = Open(origin, store, Options{CommitInterval: -1})
	require.NoError(t, err)
	_, err = s.Delete("golden")
	require.ErrorIs(t, err, ErrProtected)
	mustCheck(t, s)
	require.NoError(t, s.Close())

	// From the journal: a power cut after the Unprotect's commit, with no
	// checkpoint after it.
	oSim, sSim := blockdevtest.MustCrashSim(origin.Size(), 512), blockdevtest.MustCrashSim(store.Size(), 4096)
	require.NoError(t, blockdev.Copy(context.Background(), oSim, origin, nil))
	require.NoError(t, blockdev.Copy(context.Background(), sSim, store, nil))
	require.NoError(t, oSim.Flush())
	require.NoError(t, sSim.Flush())
	s, err = Open(oSim, sSim, Options{CommitInterval: -1})
	require.NoError(t, err)
	require.NoError(t, s.Protect("vm"))
	require.NoError(t, s.Unprotect("vm"))
	out, err := blockdevtest.CrashAll(blockdevtest.Policy{Mode: blockdevtest.Drop}, oSim, sSim)
	require.NoError(t, err)
	_ = s.Close()
	s, err = Open(out[0], out[1], Options{CommitInterval: -1})
	require.NoError(t, err)
	defer s.Close()
	info := map[string]bool{}
	for _, v := range s.List() {
		info[v.Name] = v.Protected
	}
	require.Equal(t, map[string]bool{"origin": false, "golden": true, "vm": false}, info)
	require.NoError(t, s.Unprotect("golden"))
	_, err = s.Delete("golden") // vm still needs it
	var de *DependantsError
	require.ErrorAs(t, err, &de)
	require.ErrorIs(t, err, ErrHasDependants)
	require.Equal(t, []string{"vm"}, de.Dependants)
	require.ErrorContains(t, err, `"golden" has dependants: vm`)
	d, err := s.DeleteWith("golden", DeleteOptions{Detach: true}) // hidden: vm still needs it
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	mustCheck(t, s)
}

// A plain DeleteWith refuses a snapshot with clones and lists them,
// deepest first; Recursive deletes them all; a protected dependant stops
// a recursive delete before it deletes anything.
func TestDeleteDependants(t *testing.T) {
	s := protectTree(t)
	_, err := s.DeleteWith("golden", DeleteOptions{})
	var de *DependantsError
	require.ErrorAs(t, err, &de)
	require.ErrorIs(t, err, ErrHasDependants)
	require.False(t, errors.Is(err, ErrProtected))
	require.Equal(t, []string{"vm1c", "vm1s", "vm1", "vm2"}, de.Dependants)
	_, err = s.DeleteWith("vm1s", DeleteOptions{})
	require.ErrorIs(t, err, ErrHasDependants)

	// A clone with snapshots may go on its own: the snapshots keep its data.
	_, err = s.DeleteWith("vm2", DeleteOptions{})
	require.NoError(t, err)

	require.NoError(t, s.Protect("vm1c"))
	_, err = s.DeleteWith("golden", DeleteOptions{Recursive: true})
	require.ErrorIs(t, err, ErrProtected)
	require.ErrorAs(t, err, &de)
	require.Equal(t, "vm1c", de.Blocker)
	require.Equal(t, []string{"origin", "golden", "vm1", "vm1s", "vm1c"}, names(s.List()))

	require.NoError(t, s.Unprotect("vm1c"))
	_, err = s.DeleteWith("golden", DeleteOptions{Recursive: true})
	require.NoError(t, err)
	require.Equal(t, []string{"origin"}, names(s.List()))
	require.NoError(t, s.WaitIdle(context.Background()))
	require.Len(t, s.ListAll(), 1) // no hidden point left behind
	mustCheck(t, s)
}

// Recursive delete of a clone takes its snapshots and their clones.
func TestDeleteCloneRecursive(t *testing.T) {
	s := protectTree(t)
	_, err := s.DeleteWith("vm1", DeleteOptions{Recursive: true})
	require.NoError(t, err)
	require.Equal(t, []string{"origin", "golden", "vm2"}, names(s.List()))
	require.NoError(t, s.WaitIdle(context.Background()))
	mustCheck(t, s)
}

func TestProtectRecordRoundTrip(t *testing.T) {
	ops := []op{{kind: opProtect, id: 7, on: true}, {kind: opProtect, id: 9}}
	got, err := decodeRecord(nil, encodeRecord(nil, ops), "test")
	require.NoError(t, err)
	require.Equal(t, ops, got)
	_, err = decodeRecord(nil, []byte{recordVersion, byte(opProtect), 7, 2}, "test")
	require.ErrorIs(t, err, ErrCorrupt)
}

// NoSpaceInvalidate does not delete a protected snapshot: the origin
// write fails with ErrNoSpace instead, and the snapshot keeps its data.
func TestInvalidateSparesProtected(t *testing.T) {
	s, _, _ := newMemStore(t, 256<<10, 4096+minMetaBytes+16*4096, Options{ChunkSize: 4096, Transient: true, NoSpace: NoSpaceInvalidate})
	o := s.Origin()
	snap, err := s.CreateSnapshot("s", o)
	require.NoError(t, err)
	require.NoError(t, s.Protect("s"))
	before := readChunk(t, snap, 16)
	buf := make([]byte, 4096)
	for c := range 16 {
		_, err := o.WriteAt(buf, int64(c)*4096)
		require.NoError(t, err)
	}
	_, err = o.WriteAt(buf, 16*4096)
	require.ErrorIs(t, err, ErrNoSpace)
	require.Equal(t, before, readChunk(t, snap, 16))
	require.NoError(t, s.Unprotect("s"))
	_, err = o.WriteAt(buf, 16*4096)
	require.NoError(t, err)
	_, err = s.OpenVolume("s")
	require.ErrorIs(t, err, ErrNotFound)
}
