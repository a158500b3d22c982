package snapshot

import (
	"fmt"
)

// Growing the store and the data low-space warning.
//
// A Device has a fixed size, so a grown store device (an extended LV, a
// bigger file) shows at the next Open: Open accepts a store device larger
// than its superblock records, and Grow then extends the data region to
// the device's end. The metadata region stays where and as large as it
// is: it sits between the journal and the data, so growing it would mean
// moving data (its free space is what LowMetadata reports).
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
