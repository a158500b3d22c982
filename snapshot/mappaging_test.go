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
	const head = 32 << 20
	originChunks := int64(40000)
	origin, err := blockdevtest.NewNull(originChunks*cs, 4096)
	require.NoError(t, err)
	mem, err := blockdev.NewMem(head, 4096)
	require.NoError(t, err)
	tail, err := blockdevtest.NewNull(400<<20, 4096)
	require.NoError(t, err)
	store := &blockdevtest.Split{Head: mem, Tail: tail, At: head}
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
