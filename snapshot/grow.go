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
// than its superblock records, and Grow then extends the data region to
// the device's end.
//
// The metadata region sits between the journal and the data, so it cannot
// grow in place. GrowMetadata grows it into data chunks instead: the
// layer takes the highest run of free data chunks (the tail of the data
// region, which a Grow just extended when the device grew) and makes them
// pages of the region, listed as an extent in its own superblock. The
// chunks stay in use in the data space map, so the data region's size and
// the store's superblock do not change. The extent, the chunks' bits and
// the grown page map are one tree commit: a crash before it leaves the
// region as it was and the chunks free (docs/metadata.md section 14).
//
// Grow order: the data space map grows first (in memory; durable at the
// next tree commit), then the superblock is rewritten and flushed. Chunks
// past the old end may be allocated between the two, so a crash can leave
// the metadata region mapping more data chunks than the superblock says,
// or (the tree commit not yet made) fewer. Open adopts the larger of the
// two as long as the device holds it, and rewrites the superblock.

// Grow makes the space a grown store device added usable: the data region
// is extended to the device's end. It returns the bytes added (0 when the
// device did not grow) and the LowData warning is re-armed.
func (s *Store) Grow() (int64, error) {
	if err := s.writable(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.geo
	chunks := uint64((s.store.Size() - g.dataOff) / s.cs)
	if chunks <= g.dataChunks {
		return 0, nil
	}
	if err := s.m.GrowData(chunks); err != nil {
		return 0, metaErr("grow the data space map", err)
	}
	added := int64(chunks-g.dataChunks) * s.cs
	g.dataChunks, g.storeSize = chunks, s.store.Size()
	if err := writeSuperblock(s.store, &g); err != nil {
		return 0, err // the next Open adopts the grown map (see above)
	}
	// Only these two fields change: the I/O paths read the others
	// without mu.
	s.geo.dataChunks, s.geo.storeSize = g.dataChunks, g.storeSize
	s.lowDataFired.Store(false)
	return added, nil
}

// adoptDataChunks reconciles the data chunks the metadata region maps
// (mapped) with the superblock's after a Grow a crash interrupted. Called
// by Open before the store is used.
func (s *Store) adoptDataChunks(mapped uint64) error {
	g := s.geo
	fits := uint64((s.store.Size() - g.dataOff) / s.cs)
	switch {
	case mapped == g.dataChunks:
		return nil
	case max(mapped, g.dataChunks) > fits:
		return fmt.Errorf("%w: metadata region maps %d data chunks, superblock %d, the device holds %d",
			ErrCorrupt, mapped, g.dataChunks, fits)
	case mapped < g.dataChunks:
		return metaErr("grow the data space map", s.m.GrowData(g.dataChunks))
	}
	g.dataChunks, g.storeSize = mapped, max(g.storeSize, g.dataOff+int64(mapped)*s.cs)
	if !s.opts.ReadOnly {
		if err := writeSuperblock(s.store, &g); err != nil {
			return err
		}
	}
	s.geo.dataChunks, s.geo.storeSize = g.dataChunks, g.storeSize
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
	sp := s.m.Space()
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
			sp := s.m.Space()
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
	_, err := s.m.GrowFromData(chunks)
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
