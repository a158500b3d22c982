package snapshot

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestStoreDataMapPagedOut: a store of 4 KiB chunks whose data region
// spans three bitmap pages (70,000 copies fill two and more), with a
// MetadataCache so small that the data space map keeps one page in
// memory. Snapshots taken every 32 origin writes at random, every other
// one deleted, leave every page the copies reached partly used; more
// writes fill the holes. The map reads pages back
// (Stats.SpaceMapReads), its memory stays near its share, and Check
// passes, before and after a reopen. The data region is data-less
// (blockdevtest.Null): the subject is the metadata.
func TestStoreDataMapPagedOut(t *testing.T) {
	if testing.Short() {
		t.Skip("a store of 80,000 copies: not in -short")
	}
	const cs = 4096
	originChunks := int64(40000)
	origin, store := dataLessStore(t, originChunks*cs, 400<<20)
	opts := Options{ChunkSize: cs, JournalSize: 4 << 20, MetadataBytes: 16 << 20, MetadataCache: 32 << 10}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	require.Greater(t, s.geo.dataChunks, uint64(3*32000), "the data region spans three bitmap pages")
	o := s.Origin()
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 5))
	buf := make([]byte, cs)
	snaps := 0
	write := func(n int) {
		for i := range n {
			if i%32 == 0 {
				snaps++
				_, err := s.CreateSnapshot(fmt.Sprintf("s%d", snaps), o)
				require.NoError(t, err)
			}
			_, err := o.WriteAt(buf, rng.Int64N(originChunks)*cs)
			require.NoError(t, err)
		}
	}
	write(70000)
	var names []string
	for _, v := range s.List() {
		if v.Kind == KindSnapshot {
			names = append(names, v.Name)
		}
	}
	for i, name := range names {
		if i%2 == 0 {
			_, err := s.Delete(name)
			require.NoError(t, err)
		}
	}
	require.NoError(t, s.WaitIdle(context.Background()))
	write(10000)
	mustCheck(t, s)
	st := s.Stats()
	t.Logf("space maps %d bytes in memory, %d pages read back; %d index entries", st.SpaceMapMemory, st.SpaceMapReads, st.IndexEntries)
	require.Positive(t, st.SpaceMapReads, "no bitmap page was read back")
	require.NoError(t, s.Close())

	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	mustCheck(t, s)
	o = s.Origin()
	write(3000)
	mustCheck(t, s)
	require.Less(t, s.Stats().SpaceMapMemory, int64(3*4096), "the data map past its share after a reopen")
}

// TestStoreFreesReadMapAhead: the frees of a clone's shrink, rollback and
// discard on a store whose data space map is paged out read its pages
// ahead with no lock held (Store.readMapAhead), not under the layer's lock
// as each free reaches one. Four blank volumes are written 16 chunks at a
// time in turn, so their store chunks interleave over eight bitmap pages;
// the first is shrunk to one chunk so that every page is partly used, and
// MetadataCache keeps four of them in memory. Then each operation frees
// another volume's chunks, after a checkpoint has paged pages out: pages
// are read back (MapReads) and none under the lock (MapLockedReads).
// Run again beside a goroutine that writes, discards and rewrites chunks of
// a fifth volume (its frees read ahead too, and its allocations change the
// map the read-ahead installs pages in): Check passes after it (and
// -race finds nothing); the count of locked reads is not asserted there.
func TestStoreFreesReadMapAhead(t *testing.T) {
	if testing.Short() {
		t.Skip("a store of 230,000 chunks: not in -short")
	}
	t.Run("alone", func(t *testing.T) { storeFreesReadMapAhead(t, false) })
	t.Run("beside-writer", func(t *testing.T) { storeFreesReadMapAhead(t, true) })
}

func storeFreesReadMapAhead(t *testing.T, busy bool) {
	const cs = 4096
	const run = 16 // chunks per write
	const rounds = 3600
	origin, store := dataLessStore(t, 16*cs, 1<<30)
	opts := Options{ChunkSize: cs, JournalSize: 4 << 20, MetadataBytes: 16 << 20, MetadataCache: 128 << 10}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	const size = rounds * run * cs
	names := []string{"hole", "shrink", "rollback", "discard"}
	vols := make([]*Volume, len(names))
	for i, name := range names {
		vols[i], err = s.CreateVolume(name, size)
		require.NoError(t, err)
	}
	before, err := s.CreateSnapshot("before", vols[2])
	require.NoError(t, err)
	buf := make([]byte, run*cs)
	for r := range rounds {
		for _, v := range vols {
			_, err := v.WriteAt(buf, int64(r)*run*cs)
			require.NoError(t, err)
		}
	}
	require.NoError(t, s.Resize("hole", cs, ResizeOptions{Shrink: true}))
	if busy {
		const chunks = 2048
		bv, err := s.CreateVolume("busy", chunks*cs)
		require.NoError(t, err)
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 9))
			b := make([]byte, cs)
			for {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				off := rng.Int64N(chunks) * cs
				var err error
				if rng.IntN(4) == 0 {
					err = bv.Discard(off, cs)
				} else {
					_, err = bv.WriteAt(b, off)
				}
				if err != nil {
					done <- err
					return
				}
			}
		}()
		defer func() {
			close(stop)
			require.NoError(t, <-done)
			mustCheck(t, s)
		}()
	}
	for _, step := range []struct {
		name string
		fn   func() error
	}{
		{"shrink", func() error { return s.Resize("shrink", cs, ResizeOptions{Shrink: true}) }},
		{"rollback", func() error { return s.Rollback(context.Background(), vols[2], before) }},
		{"discard", func() error { return vols[3].Discard(0, size) }},
	} {
		require.NoError(t, s.Checkpoint(context.Background()))
		sp := s.m.Space()
		require.NoError(t, step.fn(), step.name)
		now := s.m.Space()
		t.Logf("%s: %d bitmap pages read back, %d of them under the layer's lock; %d paged out, space maps %d bytes in memory",
			step.name, now.MapReads-sp.MapReads, now.MapLockedReads-sp.MapLockedReads, now.MapPagedOut, now.MapBytes)
		require.Greater(t, now.MapReads, sp.MapReads, "%s read no bitmap page back: the map did not page", step.name)
		if !busy {
			require.Equal(t, sp.MapLockedReads, now.MapLockedReads, "%s read bitmap pages under the layer's lock", step.name)
		}
	}
	mustCheck(t, s)
}

// dataLessStore returns a data-less origin of originBytes and a store
// device whose first 32 MiB (the superblock, journal and metadata) are in
// memory and whose dataBytes after them drop writes and read zeros
// (blockdevtest.Null): the tests of the metadata's paging need a large
// data region, not its data.
func dataLessStore(t *testing.T, originBytes, dataBytes int64) (origin, store blockdev.Device) {
	t.Helper()
	const head = 32 << 20
	origin, err := blockdevtest.NewNull(originBytes, 4096)
	require.NoError(t, err)
	mem, err := blockdev.NewMem(head, 4096)
	require.NoError(t, err)
	tail, err := blockdevtest.NewNull(dataBytes, 4096)
	require.NoError(t, err)
	return origin, &blockdevtest.Split{Head: mem, Tail: tail, At: head}
}
