package snapshot

import (
	"context"
	"errors"
)

// The model workload's grows of the metadata region into data chunks
// (workload_test.go's step runs them; pool_workload_test.go has the
// volume operations: create, import, resize). A grow changes no volume's
// contents, so the model only checks the region's size.

// maxMetaGrows bounds the workload's GrowMetadata calls: the region takes
// at most 64 extents, and each grow takes data chunks for good.
const maxMetaGrows = 12

// growMetadata grows the metadata region by one chunk. No free data chunk
// (the store is full) is a refusal that changes nothing.
func (w *workload) growMetadata() error {
	if w.metaGrows >= maxMetaGrows {
		return w.write(false)
	}
	w.why = "grow metadata"
	before := w.s.Stats().MetadataRegion
	added, err := w.s.GrowMetadata(context.Background(), w.s.cs)
	if errors.Is(err, ErrNoSpace) {
		return nil
	}
	if err != nil {
		return w.failed(err, "grow metadata")
	}
	w.metaGrows++
	if after := w.s.Stats().MetadataRegion; after != before+added || added != w.s.cs {
		w.t.Fatalf("seed %d step %d: grow metadata added %d bytes; the region went from %d to %d", w.seed, w.steps, added, before, after)
	}
	return nil
}
