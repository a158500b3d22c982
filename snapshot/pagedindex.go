package snapshot

import (
	"errors"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// pagedIndex is the store's index (index.go) on the paged metadata layer
// (snapshot/internal/meta, docs/metadata.md): the same entries, keyed
// (branch, chunk, epoch), with the same queries, but on the store device
// behind a bounded cache instead of in memory. Its methods mirror index's,
// with errors, because a page read can fail. It is the first step of the
// store's move onto the layer (docs/metadata.md section 10); the store does
// not use it yet.
//
// locZero and locInherit are above meta.LocSpecial, so the layer stores
// them as they are and never merges them into runs.
type pagedIndex struct {
	m *meta.Meta
}

func metaKey(b uint32, c uint64, e uint32) meta.Key { return meta.Key{B: b, C: c, E: e} }

func entryOf(k meta.Key, loc uint64) entry { return entry{b: k.B, c: k.C, e: k.E, loc: loc} }

// put inserts x; false if (b, c, e) is already present.
func (p pagedIndex) put(x entry) (bool, error) {
	err := p.m.Put(metaKey(x.b, x.c, x.e), x.loc)
	if errors.Is(err, meta.ErrExists) {
		return false, nil
	}
	return err == nil, err
}

// del removes (b, c, e) and returns the removed entry.
func (p pagedIndex) del(b uint32, c uint64, e uint32) (entry, bool, error) {
	loc, err := p.m.Delete(metaKey(b, c, e))
	if errors.Is(err, meta.ErrNotFound) {
		return entry{}, false, nil
	}
	if err != nil {
		return entry{}, false, err
	}
	return entry{b: b, c: c, e: e, loc: loc}, true, nil
}

// get returns the entry exactly at (b, c, e).
func (p pagedIndex) get(b uint32, c uint64, e uint32) (entry, bool, error) {
	loc, ok, err := p.m.Get(metaKey(b, c, e))
	if err != nil || !ok {
		return entry{}, false, err
	}
	return entry{b: b, c: c, e: e, loc: loc}, true, nil
}

// seek returns the first entry of (b, c) with epoch >= e.
func (p pagedIndex) seek(b uint32, c uint64, e uint32) (entry, bool, error) {
	k, loc, ok, err := p.m.Seek(metaKey(b, c, e))
	if err != nil || !ok || k.B != b || k.C != c {
		return entry{}, false, err
	}
	return entryOf(k, loc), true, nil
}

// prev returns the last entry of (b, c) with epoch < e.
func (p pagedIndex) prev(b uint32, c uint64, e uint32) (entry, bool, error) {
	if e == 0 {
		return entry{}, false, nil
	}
	k, loc, ok, err := p.m.Prev(metaKey(b, c, e))
	if err != nil || !ok || k.B != b || k.C != c {
		return entry{}, false, err
	}
	return entryOf(k, loc), true, nil
}

// last returns the entry of (b, c) with the greatest epoch below
// epochLive, as index.last does (its comment says "greatest epoch", but
// live entries are excluded, and the callers rely on that).
func (p pagedIndex) last(b uint32, c uint64) (entry, bool, error) {
	return p.prev(b, c, epochLive)
}

// epochBatch is how many chunks epochEntries collects from the epoch tree
// before it looks up their locations (the layer's iteration holds its
// lock, so lookups cannot run inside it).
const epochBatch = 256

// epochEntries calls fn for the entries of branch b at epoch e in chunk
// order, starting at chunk from, until fn returns false.
func (p pagedIndex) epochEntries(b uint32, e uint32, from uint64, fn func(entry) bool) error {
	batch := make([]uint64, 0, epochBatch)
	for {
		batch = batch[:0]
		err := p.m.AscendEpoch(b, e, from, func(c uint64) bool {
			batch = append(batch, c)
			return len(batch) < epochBatch
		})
		if err != nil {
			return err
		}
		for _, c := range batch {
			loc, ok, err := p.m.Get(metaKey(b, c, e))
			if err != nil {
				return err
			}
			if !ok {
				return errors.New("snapshot: paged index: epoch tree lists a key the chunk tree lacks")
			}
			if !fn(entry{b: b, c: c, e: e, loc: loc}) {
				return nil
			}
		}
		if len(batch) < epochBatch {
			return nil
		}
		from = batch[len(batch)-1] + 1
	}
}

// branchEpochs calls fn with each distinct epoch that has entries in
// branch b, in increasing order.
func (p pagedIndex) branchEpochs(b uint32, fn func(e uint32) bool) error {
	for e := uint32(0); ; e++ {
		got, ok, err := p.m.NextEpoch(b, e)
		if err != nil || !ok || !fn(got) || got == epochLive {
			return err
		}
		e = got
	}
}

// branchHas reports whether branch b has any entries.
func (p pagedIndex) branchHas(b uint32) (bool, error) {
	k, _, ok, err := p.m.Seek(metaKey(b, 0, 0))
	return ok && k.B == b, err
}

func (p pagedIndex) len() int { return int(p.m.Len()) }
