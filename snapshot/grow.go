package snapshot

import (
	"context"
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Growing the store and the data low-space warning.
//
// A Device has a fixed size, so a grown store device (an extended LV, a
// bigger file) shows at the next Open: Open accepts a store device larger
// than the data region, and Grow then extends the region to the device's
// end.
//
// The metadata region sits between the journal and the data, so it cannot
// grow in place. GrowMetadata grows it into data chunks instead: the
// layer takes the highest run of free data chunks (the tail of the data
// region, which a Grow just extended when the device grew) and makes them
// pages of the region, listed as an extent in its own superblock. The
// chunks stay in use in the data space map, so the data region's size
// does not change. The extent, the chunks' bits and the grown page map
// are one tree commit: a crash before it leaves the region as it was and
// the chunks free (docs/metadata.md section 14).
//
// The store's superblock (block 0) is a single copy, written once by
// Format and never again: a torn rewrite would lose the whole store. Its
// data chunks and store size are the data region's size at Format, a
// minimum. The metadata layer is the authority for the current size: its
// data space map's size is in its own superblock, which has two copies
// and is switched atomically by a tree commit (docs/metadata.md).
//
// Grow extends the data space map with the new chunks held (not
// allocatable) and runs a tree commit; once that commit is durable the
// chunks are released. So no journal record names a chunk past the old
// end before a durable map holds it: a crash before the commit leaves the
// grow undone and nothing referencing the new chunks, and a later Grow
// does it again. (A journal record "grow to N chunks" replayed before the
// later records would do as well, but the held chunks reuse the layer's
// existing rule for freed chunks and need no new record or replay order.)
//
// Open takes the layer's size when it is larger than the superblock's and
// the device holds it, writing nothing; a device smaller than what the
// layer maps is ErrCorrupt. A layer smaller than the superblock is a store
// an earlier build grew by rewriting the superblock, whose journal may
// name the chunks past the layer's end: Open grows the map to the
// superblock's size, usable at once.

// Grow makes the space a grown store device added usable: the data region
// is extended to the device's end, durably (Grow runs a tree commit). It
// returns the bytes added (0 when the device did not grow) and the LowData
// warning is re-armed.
func (s *Store) Grow() (int64, error) {
	if err := s.writable(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	old := s.geo.dataChunks
	chunks := uint64((s.store.Size() - s.geo.dataOff) / s.cs)
	if chunks <= old {
		s.mu.Unlock()
		return 0, nil
	}
	if err := s.m.GrowData(chunks, true); err != nil {
		s.mu.Unlock()
		return 0, metaErr("grow the data space map", err)
	}
	// Only this field changes: the I/O paths read the others without
	// mu. Nothing allocates the new chunks before the commit below.
	s.geo.dataChunks = chunks
	s.mu.Unlock()
	if err := s.treeCommit(context.Background()); err != nil {
		return 0, err
	}
	s.lowDataFired.Store(false)
	return int64(chunks-old) * s.cs, nil
}

// adoptDataChunks takes the data region's size from the chunks the
// metadata layer maps (mapped) when it is larger than the superblock's
// size at Format (see above). Called by Open before the store is used; it
// writes nothing to the store device.
func (s *Store) adoptDataChunks(mapped uint64) error {
	g := &s.geo
	fits := uint64((s.store.Size() - g.dataOff) / s.cs)
	switch {
	case mapped == g.dataChunks:
		return nil
	case max(mapped, g.dataChunks) > fits:
		return fmt.Errorf("%w: metadata region maps %d data chunks, superblock %d, the device holds %d",
			ErrCorrupt, mapped, g.dataChunks, fits)
	case mapped < g.dataChunks:
		return metaErr("grow the data space map", s.m.GrowData(g.dataChunks, false))
	}
	g.dataChunks = mapped
	return nil
}

// lowDataCheck fires the LowData warning when the free data space has
// dropped below the threshold, once until it rises above it again. Called
// after each allocation, with no lock of the store held; the callback
// runs on the notifier goroutine.
func (s *Store) lowDataCheck() {
	if s.opts.LowData == nil {
		return
	}
	sp := s.alloc.space()
	thr := s.opts.LowDataThreshold
	if thr == 0 {
		thr = int64(sp.Chunks) * s.cs / 8
	}
	if int64(sp.Chunks-sp.ChunksUsed)*s.cs >= thr {
		s.lowDataFired.Store(false)
		return
	}
	if s.lowDataFired.Swap(true) {
		return
	}
	select {
	case s.lowDataKick <- struct{}{}:
	default:
	}
}

// lowDataNotifier calls LowData for each warning, with no lock held, so
// the callback may use the store (Grow, Delete) freely. It stops at Close.
func (s *Store) lowDataNotifier() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.lowDataKick:
			sp := s.alloc.space()
			s.opts.LowData(int64(sp.Chunks-sp.ChunksUsed)*s.cs, int64(sp.Chunks)*s.cs)
		}
	}
}

// GrowMetadata grows the metadata region by at least bytes (rounded up to
// whole chunks) taken from the free data space, highest chunks first, and
// commits it. It returns the bytes added. ErrNoSpace: no run of that many
// free data chunks (Grow the store device first); ErrBadOptions: bytes is
// not positive, or the region has had 64 extents already. Run Grow first
// when the device grew: the new space then serves either region.
func (s *Store) GrowMetadata(ctx context.Context, bytes int64) (int64, error) {
	if err := s.writable(); err != nil {
		return 0, err
	}
	if bytes <= 0 {
		return 0, fmt.Errorf("%w: grow the metadata region by %d bytes", ErrBadOptions, bytes)
	}
	chunks := uint64((bytes + s.cs - 1) / s.cs)
	s.mu.Lock()
	err := s.alloc.growMetadata(chunks)
	s.mu.Unlock()
	if err != nil {
		if errors.Is(err, meta.ErrInvalid) {
			return 0, fmt.Errorf("%w: %v", ErrBadOptions, err)
		}
		return 0, metaErr("grow the metadata region", err)
	}
	s.lowDataCheck() // the data space shrank
	if err := s.treeCommit(ctx); err != nil {
		return 0, err
	}
	return int64(chunks) * s.cs, nil
}
