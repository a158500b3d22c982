package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// The workload's pool operations: blank volumes, imports and resizes.

// volumeSize is a random volume size for the workload: whole blocks, from
// one block to twice the origin's size (a pool's base size).
func (w *workload) volumeSize() int64 {
	return (1 + w.rng.Int64N(2*w.size/w.bs)) * w.bs
}

// resized returns data cut or zero-extended to size bytes.
func resized(data []byte, size int64) []byte {
	out := make([]byte, size)
	copy(out, data)
	return out
}

func (w *workload) create() error {
	w.why = "create"
	name, size := w.newName("v"), w.volumeSize()
	vol, err := w.s.CreateVolume(name, size)
	m := &vmodel{name: name, kind: KindVolume, data: make([]byte, size), durable: make([]byte, size), vol: vol}
	if err != nil {
		m.vol = nil
		w.maybeNew[name] = m
		return w.failed(err, "create "+name)
	}
	w.vols[name] = m
	return nil
}

// importVolume imports a sparse image: random runs of data, of zeros
// written, and holes.
func (w *workload) importVolume() error {
	w.why = "import"
	name, size := w.newName("i"), w.volumeSize()
	src, err := blockdev.NewMem(size, int(w.bs))
	w.must(err, "import source")
	for range 1 + w.rng.IntN(4) {
		off, n := w.randRange(size)
		p := make([]byte, n)
		if w.rng.IntN(3) > 0 {
			for i := range p {
				p[i] = byte(w.rng.Uint32())
			}
		}
		_, err := src.WriteAt(p, off)
		w.must(err, "write import source")
	}
	data := make([]byte, size)
	_, err = src.ReadAt(data, 0)
	w.must(err, "read import source")
	vol, err := w.s.Import(context.Background(), name, src, ImportOptions{})
	m := &vmodel{name: name, kind: KindVolume, data: data, durable: bytes.Clone(data), vol: vol}
	if err != nil {
		m.vol = nil
		w.maybeNew[name] = m // renamed into place, or deleted at the next Open
		return w.failed(err, "import "+name)
	}
	w.vols[name] = m
	return nil
}

func (w *workload) resize() error {
	w.why = "resize"
	v := w.pick(func(v *vmodel) bool { return writable(v) && v.kind != KindOrigin })
	if v == nil {
		return nil
	}
	size := w.volumeSize()
	old := int64(len(v.data))
	if size < old && w.rng.IntN(4) == 0 {
		err := w.s.Resize(v.name, size, ResizeOptions{})
		if err == nil {
			w.t.Fatalf("seed %d step %d: a shrink of %s without Shrink succeeded", w.seed, w.steps, v.name)
		}
		if !errors.Is(err, ErrBadOptions) {
			return w.failed(err, "refused shrink of "+v.name)
		}
	}
	err := w.s.Resize(v.name, size, ResizeOptions{Shrink: true})
	if err != nil {
		w.resized[v.name] = size
		return w.failed(err, "resize "+v.name)
	}
	v.data = resized(v.data, size)
	w.why = fmt.Sprintf("resize %d->%d", old, size)
	if size != old {
		w.makeDurable(v) // a resize commits every record before it
	}
	return nil
}

// adoptSize makes the model of v, whose volume after a crash is size
// bytes, agree with that size: a failed Resize or Rollback may have set
// it. The surviving contents are checked against durable, cut or
// zero-extended.
func (w *workload) adoptSize(v *vmodel, size int64) {
	if size == int64(len(v.durable)) {
		return
	}
	if w.resized[v.name] != size {
		w.t.Fatalf("seed %d step %d: volume %s of %d bytes after a crash, want %d", w.seed, w.steps, v.name, size, len(v.durable))
	}
	v.durable = resized(v.durable, size)
	v.data = resized(v.data, size)
}

// A store without an origin: blank and imported volumes, their snapshots
// and clones, resizes, against the model.
func TestModelWorkloadPool(t *testing.T) {
	seed := blockdevtest.Seed(t)
	store, err := blockdev.NewMem(16<<20, 512)
	require.NoError(t, err)
	w := newPoolWorkload(t, seed, store, Options{ChunkSize: 8 << 10, JournalSize: 256 << 10}, 128<<10)
	defer func() { _ = w.s.Close() }()
	for i := range shortScale(1500) {
		require.NoError(t, w.step())
		w.verifySome(i%50 == 0)
	}
	w.verifySome(true)
	mustCheck(t, w.s)
}

// newPoolWorkload is newWorkload on a store without an origin, whose
// volumes' sizes are drawn around size bytes; it starts with one blank
// volume.
func newPoolWorkload(t testing.TB, seed uint64, store blockdev.Device, opts Options, size int64) *workload {
	w := &workload{t: t, seed: seed, rng: newRand(seed), store: store, opts: opts,
		vols: map[string]*vmodel{}, size: size, maxVols: 14,
		maybeGone: map[string]bool{}, maybeNew: map[string]*vmodel{}, renamed: map[string]string{}, resized: map[string]int64{}}
	s, err := Format(nil, store, opts)
	w.must(err, "format")
	w.s, w.bs = s, int64(s.bs)
	w.must(w.create(), "first volume")
	return w
}
