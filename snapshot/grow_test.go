package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

const growChunk = 64 << 10

// fillUntilFull writes distinct chunks into v from chunk c on until the
// store is full; it returns the next chunk.
func fillUntilFull(t *testing.T, v *Volume, c int64) int64 {
	t.Helper()
	for ; c*growChunk < v.Size(); c++ {
		_, err := v.WriteAt(bytes.Repeat([]byte{byte(c)}, growChunk), c*growChunk)
		if err != nil {
			require.ErrorIs(t, err, ErrNoSpace)
			return c
		}
	}
	t.Fatal("the store never filled")
	return c
}

// biggerCopy returns a copy of dev on a device of size bytes.
func biggerCopy(t *testing.T, dev blockdev.Device, size int64) *blockdev.Mem {
	t.Helper()
	big, err := blockdev.NewMem(size, dev.BlockSize())
	require.NoError(t, err)
	require.NoError(t, blockdev.Copy(context.Background(), big, dev, nil))
	return big
}

// A full store, reopened on a larger device, takes more data after Grow,
// and keeps it across a reopen; a smaller device is refused.
func TestGrowStore(t *testing.T) {
	origin, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := Options{ChunkSize: growChunk, CommitInterval: -1, MetadataBytes: 1 << 20}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	g, err := s.CreateSnapshot("g", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	next := fillUntilFull(t, c, 0)
	before := s.Stats().dataChunks()
	require.NoError(t, s.Close())

	small, err := blockdev.Slice(store, 0, 4<<20)
	require.NoError(t, err)
	_, err = Open(origin, small, opts)
	require.ErrorIs(t, err, ErrCorrupt) // a smaller device than the superblock says

	big := biggerCopy(t, store, 16<<20)
	s, err = Open(origin, big, opts)
	require.NoError(t, err)
	require.Equal(t, before, s.Stats().dataChunks())
	added, err := s.Grow()
	require.NoError(t, err)
	require.Equal(t, int64(8<<20), added)
	require.Equal(t, before+128, s.Stats().dataChunks())
	added, err = s.Grow()
	require.NoError(t, err)
	require.Zero(t, added)
	c = mustOpen(t, s, "c")
	end := fillUntilFull(t, c, next)
	require.Greater(t, end, next+100)
	mustCheck(t, s)
	require.NoError(t, s.Close())

	s, err = Open(origin, big, opts)
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, before+128, s.Stats().dataChunks())
	c = mustOpen(t, s, "c")
	require.Equal(t, bytes.Repeat([]byte{byte(end - 1)}, growChunk), amReadAt(t, c, (end-1)*growChunk))
	mustCheck(t, s)
}

func amReadAt(t *testing.T, v *Volume, off int64) []byte {
	t.Helper()
	p := make([]byte, growChunk)
	_, err := v.ReadAt(p, off)
	require.NoError(t, err)
	return p
}

// block0 returns a copy of the store's superblock block.
func block0(t *testing.T, dev blockdev.Device) []byte {
	t.Helper()
	p := blockdev.AlignedBuffer(superblockSize)
	_, err := dev.ReadAt(p, 0)
	require.NoError(t, err)
	return p
}

// Open sizes the data region from the metadata layer, never writing the
// superblock: a layer grown and committed (the way Grow leaves it) is
// adopted; a layer smaller than the superblock (a store an earlier build
// grew by rewriting the superblock, its tree commit lost) is grown to the
// superblock's size, usable at once. Both then take writes past the
// Format size and keep them across a reopen.
func TestGrowInterrupted(t *testing.T) {
	opts := Options{ChunkSize: growChunk, CommitInterval: -1, MetadataBytes: 1 << 20}
	for _, layerGrown := range []bool{true, false} {
		origin, err := blockdev.NewMem(16<<20, 512)
		require.NoError(t, err)
		store, err := blockdev.NewMem(8<<20, 4096)
		require.NoError(t, err)
		s, err := Format(origin, store, opts)
		require.NoError(t, err)
		c, err := s.CreateClone("c", s.Origin())
		require.NoError(t, err)
		next := fillUntilFull(t, c, 0)
		before := s.Stats().dataChunks()
		require.NoError(t, s.Close())
		big := biggerCopy(t, store, 12<<20)
		s, err = Open(origin, big, opts)
		require.NoError(t, err)
		if layerGrown {
			require.NoError(t, s.m.GrowData(before+64, true))
		} else {
			g := s.geo
			g.dataChunks, g.storeSize = before+64, big.Size()
			require.NoError(t, writeSuperblock(big, &g))
		}
		require.NoError(t, s.Close()) // commits the tree, writes no superblock
		sb := block0(t, big)
		s, err = Open(origin, big, opts)
		require.NoError(t, err, "layerGrown=%v", layerGrown)
		require.Equal(t, before+64, s.Stats().dataChunks())
		mustCheck(t, s)
		c = mustOpen(t, s, "c")
		end := fillUntilFull(t, c, next)
		require.Equal(t, next+64, end, "layerGrown=%v: the grown chunks take writes", layerGrown)
		mustCheck(t, s)
		require.NoError(t, s.Close())
		require.Equal(t, sb, block0(t, big), "layerGrown=%v: Open rewrote the superblock", layerGrown)

		s, err = Open(origin, big, opts)
		require.NoError(t, err)
		require.Equal(t, before+64, s.Stats().dataChunks())
		c = mustOpen(t, s, "c")
		require.Equal(t, bytes.Repeat([]byte{byte(end - 1)}, growChunk), amReadAt(t, c, (end-1)*growChunk))
		mustCheck(t, s)
		require.NoError(t, s.Close())

		// A device smaller than what the layer maps is refused.
		small, err := blockdev.Slice(big, 0, 10<<20)
		require.NoError(t, err)
		_, err = Open(origin, small, opts)
		require.ErrorIs(t, err, ErrCorrupt, "layerGrown=%v", layerGrown)
	}
}

// Block 0, the store's single-copy superblock, is byte-identical before
// and after Grow, GrowMetadata and the reopens between them.
func TestGrowKeepsSuperblock(t *testing.T) {
	origin, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := Options{ChunkSize: growChunk, CommitInterval: -1, MetadataBytes: 1 << 20}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	next := fillUntilFull(t, c, 0)
	require.NoError(t, s.Close())
	sb := block0(t, store)

	big := biggerCopy(t, store, 16<<20)
	s, err = Open(origin, big, opts)
	require.NoError(t, err)
	added, err := s.Grow()
	require.NoError(t, err)
	require.Equal(t, int64(8<<20), added)
	require.Equal(t, sb, block0(t, big), "Grow")
	grown, err := s.GrowMetadata(context.Background(), 1<<20)
	require.NoError(t, err)
	require.Equal(t, int64(1<<20), grown)
	require.Equal(t, sb, block0(t, big), "GrowMetadata")
	c = mustOpen(t, s, "c")
	end := fillUntilFull(t, c, next)
	require.Equal(t, next+128-16, end, "the grown data region less the metadata's chunks")
	mustCheck(t, s)
	chunks := s.Stats().dataChunks()
	require.NoError(t, s.Close())
	require.Equal(t, sb, block0(t, big), "Close")

	s, err = Open(origin, big, opts)
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, sb, block0(t, big), "Open")
	require.Equal(t, chunks, s.Stats().dataChunks())
	c = mustOpen(t, s, "c")
	require.Equal(t, bytes.Repeat([]byte{byte(end - 1)}, growChunk), amReadAt(t, c, (end-1)*growChunk))
	mustCheck(t, s)
}

// LowData fires when the free data space drops below the threshold, once
// per crossing: freeing space (a delete) re-arms it.
func TestLowDataCallback(t *testing.T) {
	type call struct{ free, total int64 }
	calls := make(chan call, 16)
	origin, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	const thr = 1 << 20
	opts := Options{ChunkSize: growChunk, CommitInterval: -1, MetadataBytes: 1 << 20, LowDataThreshold: thr,
		LowData: func(free, total int64) { calls <- call{free, total} }}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	g, err := s.CreateSnapshot("g", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", g)
	require.NoError(t, err)
	total := int64(s.Stats().dataChunks()) * growChunk
	n := (total - thr) / growChunk // the last write that leaves the threshold free
	for i := int64(0); i < n; i++ {
		fillAt(t, c, 1, i*growChunk, growChunk)
	}
	require.Empty(t, calls)
	fillAt(t, c, 1, n*growChunk, growChunk) // below the threshold now
	got := <-calls
	require.Less(t, got.free, int64(thr))
	require.Equal(t, total, got.total)
	fillAt(t, c, 1, (n+1)*growChunk, growChunk) // still below: no second call
	d, err := s.Delete("c")
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	c2, err := s.CreateClone("c2", g)
	require.NoError(t, err)
	for i := int64(0); i <= n; i++ {
		fillAt(t, c2, 2, i*growChunk, growChunk)
	}
	got = <-calls // re-armed by the free space, fired again
	require.Less(t, got.free, int64(thr))
	require.Empty(t, calls)
}
