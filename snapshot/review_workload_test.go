package snapshot

import (
	"context"
	"errors"
	"fmt"
)

// The model workload's pool operations (workload_test.go's step runs
// them): blank volumes beside the origin's tree, and grows of the
// metadata region into data chunks. A blank volume has the origin's size,
// as every volume of the model does, and starts as zeros; from then on it
// is written, snapshotted, cloned, reset, diffed and deleted like any
// other writable volume.

// maxMetaGrows bounds the workload's GrowMetadata calls: the region takes
// at most 64 extents, and each grow takes data chunks for good.
const maxMetaGrows = 12

func (w *workload) poolOp() error {
	if w.rng.IntN(3) == 0 && w.metaGrows < maxMetaGrows {
		return w.growMetadata()
	}
	if len(w.vols) > w.maxVols {
		return w.write(false)
	}
	w.why = "create volume"
	name := w.newName("v")
	m := &vmodel{name: name, kind: KindVolume, data: make([]byte, w.size), durable: make([]byte, w.size)}
	vol, err := w.s.CreateVolume(name, w.size)
	if err != nil {
		w.maybeNew[name] = m
		return w.failed(err, "create volume "+name)
	}
	if vol.Kind() != KindVolume || vol.Size() != w.size {
		w.t.Fatalf("seed %d step %d: volume %s is a %v of %d bytes", w.seed, w.steps, name, vol.Kind(), vol.Size())
	}
	m.vol = vol
	w.vols[name] = m
	w.blanks++
	return nil
}

// growMetadata grows the metadata region by one chunk. No free data chunk
// (the store is full) is a refusal that changes nothing.
func (w *workload) growMetadata() error {
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
		w.t.Fatalf("seed %d step %d: %s", w.seed, w.steps, fmt.Sprintf("grow metadata added %d bytes; the region went from %d to %d", added, before, after))
	}
	return nil
}
