package snapshot

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// The model-based workload: random operations against the store and
// against a plain model (a byte slice per volume), shared by the model
// test, the crash torture and the error sweep.

type vmodel struct {
	name    string
	kind    Kind
	data    []byte // what reads must return now
	durable []byte // writable volumes: contents as of the last durability point
	pending []pwrite
	history []pwrite
	parent  string // snapshots: the volume they were taken of
	vol     *Volume
}

// pwrite is a write (data nil: discard) not yet known durable.
type pwrite struct {
	off  int64
	data []byte
	n    int64
	step int
}

type workload struct {
	t      testing.TB
	seed   uint64
	rng    *rand.Rand
	s      *Store
	origin blockdev.Device
	store  blockdev.Device
	opts   Options
	vols   map[string]*vmodel
	serial int
	bs     int64
	size   int64
	// failOK: operations may fail (error sweep); a failed step stops the run.
	failOK bool
	steps  int
	why    string // what the current step is (diagnostics)
	// maxVols bounds the number of volumes (0: 14).
	maxVols int
	// After a failed operation: volumes that may or may not exist, and
	// renames that may or may not have happened.
	maybeGone map[string]bool
	maybeNew  map[string]*vmodel
	renamed   map[string]string
	// resized: volumes whose failed Resize or Rollback may have given
	// them this size.
	resized map[string]int64
	// Counted over every store the workload opened (see retire): foreground
	// checkpoints, and snapshots NoSpaceInvalidate deleted; metadata
	// pages read on a cache miss and evicted.
	emergencies, invalidated int64
	metaMisses, metaEvicted  uint64
	metaGrows                int // GrowMetadata calls that grew the region
}

// retire adds the counters of the store about to be closed to w's.
func (w *workload) retire() {
	w.emergencies += w.s.emergencies.Load()
	cs := w.s.m.CacheStats()
	w.metaMisses += cs.Misses
	w.metaEvicted += cs.Evicted
}

func newWorkload(t testing.TB, seed uint64, origin, store blockdev.Device, opts Options) *workload {
	w := &workload{t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, 99)), origin: origin, store: store, opts: opts,
		vols: map[string]*vmodel{}, size: origin.Size(), maxVols: 14,
		maybeGone: map[string]bool{}, maybeNew: map[string]*vmodel{}, renamed: map[string]string{}, resized: map[string]int64{}}
	s, err := Format(origin, store, opts)
	w.must(err, "format")
	w.s = s
	w.bs = int64(s.bs)
	data := make([]byte, w.size)
	_, err = origin.ReadAt(data, 0)
	w.must(err, "read origin")
	w.vols[originName] = &vmodel{name: originName, kind: KindOrigin, data: data, durable: bytes.Clone(data), vol: s.Origin()}
	return w
}

func (w *workload) must(err error, format string, args ...any) {
	w.t.Helper()
	if err != nil {
		w.t.Fatalf("seed %d step %d: %s: %v", w.seed, w.steps, fmt.Sprintf(format, args...), err)
	}
}

func (w *workload) names(filter func(*vmodel) bool) []string {
	var out []string
	for n, v := range w.vols {
		if filter == nil || filter(v) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

func (w *workload) pick(filter func(*vmodel) bool) *vmodel {
	ns := w.names(filter)
	if len(ns) == 0 {
		return nil
	}
	return w.vols[ns[w.rng.IntN(len(ns))]]
}

func writable(v *vmodel) bool { return v.kind != KindSnapshot }
func isSnap(v *vmodel) bool   { return v.kind == KindSnapshot }

// randRange returns a random range of whole blocks of a volume of size
// bytes: mostly short, one in sixteen as long as the volume allows (more
// than one 64-chunk segment where the volume is that large).
func (w *workload) randRange(size int64) (int64, int64) {
	blocks := size / w.bs
	if w.rng.IntN(16) == 0 && blocks >= 4 {
		off := w.rng.Int64N(blocks / 4)
		return off * w.bs, (blocks - off - w.rng.Int64N(blocks/4)) * w.bs
	}
	off := w.rng.Int64N(blocks)
	n := 1 + w.rng.Int64N(min(blocks-off, 48))
	return off * w.bs, n * w.bs
}

// step runs one random operation; it returns an error only when failOK.
func (w *workload) step() error {
	w.steps++
	r := w.rng.IntN(106)
	if len(w.vols) > w.maxVols && (r >= 50 && r < 70 || r >= 100 && r < 103) {
		r += 20 // keep the volume count (and the store's fill) bounded
	}
	switch {
	case r < 35:
		return w.write(false)
	case r < 42:
		return w.write(true)
	case r < 50:
		return w.flush()
	case r < 62:
		return w.snapshot()
	case r < 70:
		return w.clone()
	case r < 80:
		return w.delete()
	case r < 85:
		return w.rollback()
	case r < 87:
		return w.rename()
	case r < 92:
		return w.diff()
	case r >= 100 && r < 102:
		return w.create()
	case r == 102:
		return w.importVolume()
	case r >= 103:
		return w.resize()
	default:
		if w.opts.Transient {
			return w.write(false)
		}
		if r < 94 {
			return w.growMetadata() // review_workload_test.go
		}
		return w.reopen()
	}
}

func (w *workload) failed(err error, what string) error {
	w.t.Helper()
	if err != nil && !w.failOK {
		w.must(err, "%s", what)
	}
	return err
}

func (w *workload) write(discard bool) error {
	w.why = map[bool]string{false: "write", true: "discard"}[discard]
	v := w.pick(writable)
	if v == nil {
		return nil
	}
	off, n := w.randRange(int64(len(v.data)))
	var p []byte
	var err error
	defer w.mayInvalidate(v, &err)()
	switch {
	case discard && w.rng.IntN(2) == 0:
		err = v.vol.WriteZeroes(off, n) // zero mappings, like Discard on a clone
	case discard:
		err = v.vol.Discard(off, n)
	default:
		p = make([]byte, n)
		for i := range p {
			p[i] = byte(w.rng.Uint32())
		}
		_, err = v.vol.WriteAt(p, off)
	}
	// A failed write may have written any part of the range.
	v.pending = append(v.pending, pwrite{off: off, data: p, n: n, step: w.steps})
	v.history = append(v.history, pwrite{off: off, data: p, n: n, step: w.steps})
	if err == nil {
		if discard {
			clear(v.data[off : off+n])
		} else {
			copy(v.data[off:], p)
		}
	}
	return w.failed(err, fmt.Sprintf("write %d at %d of %s (discard %v)", n, off, v.name, discard))
}

// mayInvalidate is called before a write to v: under NoSpaceInvalidate an
// origin write may delete snapshots of the origin to make room. Until the
// write returns, a crash may leave them or not; the function it returns,
// called after the write (with its error), forgets those that are gone.
func (w *workload) mayInvalidate(v *vmodel, err *error) func() {
	if v.kind != KindOrigin || w.opts.NoSpace != NoSpaceInvalidate {
		return func() {}
	}
	ofOrigin := w.names(func(o *vmodel) bool { return isSnap(o) && o.parent == originName })
	for _, name := range ofOrigin {
		w.maybeGone[name] = true
	}
	return func() {
		if *err != nil {
			return
		}
		for _, name := range ofOrigin {
			delete(w.maybeGone, name)
			if _, gone := w.s.OpenVolume(name); errors.Is(gone, ErrNotFound) {
				w.invalidated++
				delete(w.vols, name)
			}
		}
	}
}

func (w *workload) makeDurable(v *vmodel) {
	v.durable = bytes.Clone(v.data)
	v.pending = nil
	v.history = append(v.history, pwrite{off: 0, n: 0, step: w.steps, data: []byte(w.why)}) // a durability point
}

func (w *workload) flush() error {
	w.why = "flush"
	v := w.pick(writable)
	if v == nil {
		return nil
	}
	err := v.vol.Flush()
	if err == nil {
		w.makeDurable(v)
	}
	return w.failed(err, "flush "+v.name)
}

func (w *workload) newName(prefix string) string {
	w.serial++
	return fmt.Sprintf("%s%d", prefix, w.serial)
}

func (w *workload) snapshot() error {
	w.why = "snapshot"
	v := w.pick(writable)
	if v == nil {
		return nil
	}
	name := w.newName("s")
	vol, err := w.s.CreateSnapshot(name, v.vol)
	if err != nil {
		w.maybeNew[name] = &vmodel{name: name, kind: KindSnapshot, data: bytes.Clone(v.data), parent: v.name}
		return w.failed(err, "snapshot of "+v.name)
	}
	w.makeDurable(v)
	w.vols[name] = &vmodel{name: name, kind: KindSnapshot, data: bytes.Clone(v.data), parent: v.name, vol: vol}
	return nil
}

func (w *workload) clone() error {
	w.why = "clone"
	v := w.pick(nil)
	if v == nil {
		return nil
	}
	name := w.newName("c")
	vol, err := w.s.CreateClone(name, v.vol)
	if err != nil {
		w.maybeNew[name] = &vmodel{name: name, kind: KindClone, data: bytes.Clone(v.data), durable: bytes.Clone(v.data)}
		return w.failed(err, "clone of "+v.name)
	}
	if writable(v) {
		w.makeDurable(v)
	}
	w.vols[name] = &vmodel{name: name, kind: KindClone, data: bytes.Clone(v.data), durable: bytes.Clone(v.data), vol: vol}
	return nil
}

func (w *workload) delete() error {
	w.why = "delete"
	v := w.pick(func(v *vmodel) bool { return v.kind != KindOrigin })
	if v == nil {
		return nil
	}
	if w.rng.IntN(4) == 0 { // a protected volume refuses the delete
		if err := w.s.Protect(v.name); err != nil {
			return w.failed(err, "protect "+v.name)
		}
		_, err := w.s.Delete(v.name)
		if err == nil {
			w.t.Fatalf("seed %d: delete of protected %s succeeded", w.seed, v.name)
		}
		if !errors.Is(err, ErrProtected) {
			return w.failed(err, "delete of protected "+v.name)
		}
		if err := w.s.Unprotect(v.name); err != nil {
			return w.failed(err, "unprotect "+v.name)
		}
	}
	d, err := w.s.Delete(v.name)
	if errors.Is(err, ErrProtected) { // a crash came between Protect and Unprotect
		if err = w.s.Unprotect(v.name); err == nil {
			d, err = w.s.Delete(v.name)
		}
	}
	if errors.Is(err, ErrHasDependants) {
		// A snapshot with clones is refused, naming them; detached, it
		// goes as a hidden parent point.
		var de *DependantsError
		if !errors.As(err, &de) || de.Name != v.name || len(de.Dependants) == 0 {
			return w.failed(fmt.Errorf("refusal %v does not list the dependants", err), "delete "+v.name)
		}
		d, err = w.s.DeleteWith(v.name, DeleteOptions{Detach: true})
	}
	if err != nil {
		w.maybeGone[v.name] = true
		return w.failed(err, "delete "+v.name)
	}
	delete(w.vols, v.name)
	// Snapshots taken of a deleted clone keep their contents; forget the
	// link.
	for _, o := range w.vols {
		if o.parent == v.name {
			o.parent = ""
		}
	}
	if w.rng.IntN(3) == 0 {
		return w.failed(d.Wait(context.Background()), "wait for delete of "+v.name)
	}
	return nil
}

func (w *workload) rollback() error {
	w.why = "rollback"
	snap := w.pick(func(v *vmodel) bool { return isSnap(v) && v.parent != "" })
	if snap == nil {
		return nil
	}
	v := w.vols[snap.parent]
	if w.rng.IntN(2) == 0 {
		v, snap = w.ancestorReset(v, snap)
	}
	if v == nil {
		return nil
	}
	var err error
	defer w.mayInvalidate(v, &err)()
	err = w.s.Rollback(context.Background(), v.vol, snap.vol)
	n := int64(len(snap.data))
	v.pending = append(v.pending, pwrite{off: 0, data: bytes.Clone(snap.data), n: n, step: w.steps})
	v.history = append(v.history, pwrite{off: 0, data: bytes.Clone(snap.data), n: n, step: -w.steps})
	if err != nil {
		if n != int64(len(v.data)) {
			w.resized[v.name] = n // a clone takes the snapshot's size at the end
		}
		return w.failed(err, "rollback of "+v.name+" to "+snap.name)
	}
	v.data = bytes.Clone(snap.data)
	w.makeDurable(v)
	return nil
}

// ancestorReset picks a clone and a snapshot of one of its ancestors (the
// store's parent links, deleted volumes included, say which), or returns
// v and snap unchanged when there is none.
func (w *workload) ancestorReset(v, snap *vmodel) (*vmodel, *vmodel) {
	clone := w.pick(func(x *vmodel) bool { return x.kind == KindClone && x.vol != nil })
	if clone == nil {
		return v, snap
	}
	info := map[uint64]VolumeInfo{}
	for _, i := range w.s.ListAll() {
		info[i.ID] = i
	}
	anc := map[uint64]bool{}
	for id := clone.vol.ID(); ; {
		p, ok := info[info[id].Parent] // the snapshot id was cloned from
		if !ok || p.Kind != KindSnapshot {
			break
		}
		anc[p.Parent] = true // the volume that snapshot was taken of
		id = p.Parent
		if info[id].Kind != KindClone {
			break
		}
	}
	var cands []*vmodel
	for _, n := range w.names(func(x *vmodel) bool { return isSnap(x) && x.vol != nil }) {
		if x := w.vols[n]; anc[x.vol.Info().Parent] {
			cands = append(cands, x)
		}
	}
	if len(cands) == 0 {
		return v, snap
	}
	return clone, cands[w.rng.IntN(len(cands))]
}

func (w *workload) rename() error {
	w.why = "rename"
	v := w.pick(func(v *vmodel) bool { return v.kind != KindOrigin })
	if v == nil {
		return nil
	}
	name := w.newName("r")
	if err := w.s.Rename(v.name, name); err != nil {
		w.renamed[v.name] = name
		return w.failed(err, "rename "+v.name)
	}
	delete(w.vols, v.name)
	for _, o := range w.vols {
		if o.parent == v.name {
			o.parent = name
		}
	}
	v.name = name
	w.vols[name] = v
	return nil
}

// diff checks that Diff between a snapshot and its volume (or a later
// snapshot of it) covers every chunk whose contents differ.
func (w *workload) diff() error {
	w.why = "diff"
	a := w.pick(func(v *vmodel) bool { return isSnap(v) && v.parent != "" })
	if a == nil {
		return nil
	}
	b := w.vols[a.parent]
	if b == nil {
		return nil
	}
	if later := w.pick(func(v *vmodel) bool { return isSnap(v) && v.parent == a.parent && v != a }); later != nil && w.rng.IntN(2) == 0 {
		b = later
	}
	if len(a.data) != len(b.data) {
		return nil // a resize came between: Diff compares volumes of one size
	}
	size := int64(len(a.data))
	chunks := uint64((size + w.s.cs - 1) / w.s.cs)
	covered := make([]bool, chunks)
	for e, err := range w.s.Diff(a.vol, b.vol) {
		if err != nil {
			return w.failed(err, "diff")
		}
		for off := e.Off; off < e.Off+e.Len; off += w.s.cs {
			covered[off/w.s.cs] = true
		}
		if e.Zero && !w.failOK {
			newer := b
			if b.kind == KindSnapshot && b.vol.meta.epoch < a.vol.meta.epoch {
				newer = a
			}
			require.True(w.t, blockdev.IsZero(newer.data[e.Off:e.Off+e.Len]), "seed %d: diff extent %+v reported zero", w.seed, e)
		}
	}
	for c := uint64(0); c < chunks; c++ {
		lo, hi := int64(c)*w.s.cs, min(int64(c+1)*w.s.cs, size)
		if !covered[c] && !bytes.Equal(a.data[lo:hi], b.data[lo:hi]) {
			w.t.Fatalf("seed %d step %d: diff %s..%s misses chunk %d", w.seed, w.steps, a.name, b.name, c)
		}
	}
	return nil
}

func (w *workload) reopen() error {
	w.why = "reopen"
	w.retire()
	err := w.s.Close()
	if err != nil && !w.failOK {
		w.must(err, "close")
	}
	if err != nil {
		return err
	}
	for _, v := range w.vols {
		if writable(v) && err == nil {
			w.makeDurable(v)
		}
	}
	return w.open(err)
}

// open opens the store on w's devices and reopens every volume handle.
func (w *workload) open(prev error) error {
	s, err := Open(w.origin, w.store, w.opts)
	if err != nil {
		if w.failOK {
			return err
		}
		w.must(err, "open")
	}
	w.s = s
	w.must(s.WaitIdle(context.Background()), "wait idle")
	if err := s.Check(); err != nil && (!w.failOK || s.usable() == nil) {
		w.must(err, "check after reopen")
	}
	if err := clonecountStatsAgree(s); err != nil && (!w.failOK || s.usable() == nil) {
		if w.failOK && errors.Is(err, blockdevtest.ErrCrashed) {
			return err // the power cut came in the comparison's page reads, which fail no store
		}
		w.must(err, "stat after reopen")
	}
	for _, name := range w.names(nil) {
		vol, err := s.OpenVolume(name)
		if err != nil && w.failOK {
			return err
		}
		w.must(err, "reopen volume %s", name)
		w.vols[name].vol = vol
	}
	return prev
}

// verifySome reads every volume (all) or three random ones and compares
// them with the model.
func (w *workload) verifySome(all bool) {
	w.t.Helper()
	names := w.names(nil)
	if !all {
		w.rng.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
		names = names[:min(3, len(names))]
	}
	for _, name := range names {
		v := w.vols[name]
		if got := v.vol.Size(); got != int64(len(v.data)) {
			w.t.Fatalf("seed %d step %d: volume %s of %d bytes, want %d", w.seed, w.steps, name, got, len(v.data))
		}
		buf := make([]byte, len(v.data))
		_, err := v.vol.ReadAt(buf, 0)
		w.must(err, "read %s", name)
		if i := blockdevtest.FirstDiff(buf, v.data); i >= 0 {
			w.t.Fatalf("seed %d step %d: volume %s (%v) differs from the model at byte %d (chunk %d): got %#x want %#x",
				w.seed, w.steps, name, v.kind, i, int64(i)/w.s.cs, buf[i], v.data[i])
		}
	}
}

func TestModelWorkload(t *testing.T) {
	for _, m := range []struct {
		name  string
		opts  Options
		steps int
		size  int64 // origin size (0: 256 KiB)
		bs    int   // device block size (0: 512)
	}{
		{"journal-4k", Options{ChunkSize: 4 << 10, JournalSize: 256 << 10}, 2500, 0, 0},
		{"journal-16k", Options{ChunkSize: 16 << 10}, 1500, 0, 0},
		{"transient", Options{ChunkSize: 8 << 10, Transient: true}, 1500, 0, 0},
		// More than 64 chunks (writes span several segments), the last
		// one partial, on 4096-byte devices.
		{"journal-4k-partial-chunk", Options{ChunkSize: 8 << 10, JournalSize: 256 << 10}, 1000, 600 << 10, 4096},
	} {
		t.Run(m.name, func(t *testing.T) {
			seed := blockdevtest.Seed(t)
			size, bs := cmp.Or(m.size, 256<<10), cmp.Or(m.bs, 512)
			origin, _ := blockdev.NewMem(size, bs)
			store, _ := blockdev.NewMem(max(8<<20, 40*size), bs)
			fillPattern(t, origin, seed)
			w := newWorkload(t, seed, origin, store, m.opts)
			defer func() { _ = w.s.Close() }()
			for i := range shortScale(m.steps) {
				require.NoError(t, w.step())
				w.verifySome(i%50 == 0)
			}
			w.verifySome(true)
			mustCheck(t, w.s)
			t.Logf("metadata region grown %d times", w.metaGrows)
			if !m.opts.Transient && !testing.Short() {
				require.Positive(t, w.metaGrows, "the workload never grew the metadata region")
			}
		})
	}
}
