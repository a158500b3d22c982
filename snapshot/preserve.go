package snapshot

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// The origin's preserved epochs: a bounded cache over the tree.
//
// A chunk's preserved epoch is the greatest epoch of origin chunk c's
// entries (branch 0, live excluded). It is what the tree says, so it need
// not be kept: the store keeps the epochs of the chunks it has looked up
// or copied lately, in a cache whose size is charged to
// Options.MetadataCache (presShare of it), and looks any other up in the
// tree (one Prev) on first use. Memory is therefore bounded by the cache,
// not by the origin's size (an array of them cost 4 bytes per origin
// chunk: 1 GiB for a 1 TiB origin at 4 KiB chunks). Open forgets them
// all, so Open costs the same whatever the history, and a chunk the
// workload never writes again costs no lookup at all.
//
// The cache is split by origin stripe (c % nStripes), so the stripe lock
// that guards a chunk's copy-on-write guards its slot too: each stripe's
// table is read under the stripe (shared, with the branch-0 gate shared)
// or under Store.mu, and changed only with both the stripe exclusively
// (or the branch-0 gate exclusively) and Store.mu held. An eviction
// therefore removes only chunks of the stripe its writer holds. Dropping
// an entry is always safe: the index entry and the cached epoch change
// together under Store.mu, so the tree holds what the cache held, or
// less where a delete removed entries (a stale high epoch only covers
// epochs no snapshot holds any more; new snapshots get greater numbers,
// so the tree's exact value answers the same).
//
// After Format every chunk's epoch is 0, and the cache answers "absent"
// as 0 (presZero) until its first eviction or the next Open; after that
// an absent chunk is unknown and looked up.

// presShare is the part of Options.MetadataCache (1/presShare) given to
// the preserved-epoch cache; the node cache gets the rest.
const presShare = 8

// presSlotBytes is the memory of one slot (a key and an epoch), and
// presMinSlots the least slots a stripe's table gets whatever the cache
// size, so a tiny test cache still holds a segment's chunks.
const (
	presSlotBytes = 12
	presMinSlots  = 8
)

// presTable is one origin stripe's cached epochs: open addressing with
// linear probing; a key is c/nStripes+1 (0: an empty slot).
type presTable struct {
	keys []uint64
	vals []uint32
	n    int // occupied slots
	hand int // the next slot an eviction looks at
	// shared: keys and vals are also a clone's (Check's), which reads
	// them without the locks: the next change copies them first (own).
	// Atomic: two Checks of a store that cannot commit mark it at once,
	// under Store.mu shared.
	shared atomic.Bool
}

// own gives t arrays of its own before a change in place, if a clone
// shares them.
func (t *presTable) own() {
	if t.shared.Load() {
		t.keys, t.vals = slices.Clone(t.keys), slices.Clone(t.vals)
		t.shared.Store(false)
	}
}

// presCache is the preserved-epoch cache (see above for its locking).
type presCache struct {
	t        [nStripes]presTable
	maxSlots int // per stripe, a power of two
	// zero: an absent chunk's epoch is 0 (since Format, before any
	// eviction). Atomic: a writer of one stripe clears it while readers of
	// others hold only theirs.
	zero atomic.Bool
}

// presBudget is the preserved-epoch cache's share of a MetadataCache of
// cache bytes (0: the default).
func presBudget(cache int64) int64 {
	if cache <= 0 {
		cache = meta.DefaultCacheBytes
	}
	return cache / presShare
}

// dataMapBytes is the memory the metadata layer's data space map may keep
// of its partly used bitmap pages (meta.Options.MapBytes): one bit per
// data chunk, at most an eighth of MapBytes (0: the default). Past it the
// layer pages bitmap pages out and reads them back on use; pages all
// clear or all set cost nothing.
func dataMapBytes(cache int64, dataChunks uint64) int64 {
	if cache <= 0 {
		cache = meta.DefaultCacheBytes
	}
	return min(int64((dataChunks+7)/8), cache/mapShare)
}

// mapShare: the data space map's share of MetadataCache is 1/mapShare.
const mapShare = 8

// spaceMapBytes bounds the memory of the metadata layer's space maps: the
// data map's (dataMapBytes) and the metadata map's one bit per metadata
// page (a small map, never paged out). The held bits of recent frees come
// on top for a while, by page, and the pages the open transaction changed
// may pass the data map's bound until a commit makes them durable.
func spaceMapBytes(cache int64, dataChunks, metaPages uint64) int64 {
	return dataMapBytes(cache, dataChunks) + int64((metaPages+7)/8)
}

// nodeCacheBytes is the metadata layer's node cache: what MetadataCache
// (0: the default) leaves after the preserved epochs and the space maps,
// so that the option bounds all three; at least a quarter of it (a cache
// smaller than the metadata map then bounds only the nodes and epochs).
func nodeCacheBytes(cache int64, dataChunks, metaPages uint64) int64 {
	if cache <= 0 {
		cache = meta.DefaultCacheBytes
	}
	return max(cache-presBudget(cache)-spaceMapBytes(cache, dataChunks, metaPages), cache/4)
}

// presSlotsFor returns the per-stripe table size for a budget of bytes.
func presSlotsFor(budget int64) int {
	n := presMinSlots
	for int64(2*n)*presSlotBytes*nStripes <= budget {
		n *= 2
	}
	return n
}

func presHash(k uint64) uint64 { return k * 0x9e3779b97f4a7c15 }

// find returns k's slot and whether it holds k (else the empty slot that
// ends its probe). The table must have slots.
func (t *presTable) find(k uint64) (int, bool) {
	mask := len(t.keys) - 1
	i := int(presHash(k)>>32) & mask
	for {
		switch t.keys[i] {
		case k:
			return i, true
		case 0:
			return i, false
		}
		i = (i + 1) & mask
	}
}

func (t *presTable) get(k uint64) (uint32, bool) {
	if t.n == 0 {
		return 0, false
	}
	i, ok := t.find(k)
	return t.vals[i], ok
}

// remove empties slot i, moving later keys of its probe run back
// (backward-shift deletion: no tombstones).
func (t *presTable) remove(i int) {
	mask := len(t.keys) - 1
	j := i
	for {
		j = (j + 1) & mask
		if t.keys[j] == 0 {
			break
		}
		home := int(presHash(t.keys[j])>>32) & mask
		// keys[j] may move to i if its home is not within (i, j].
		if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
			t.keys[i], t.vals[i] = t.keys[j], t.vals[j]
			i = j
		}
	}
	t.keys[i], t.vals[i] = 0, 0
	t.n--
}

// resize rehashes into size slots.
func (t *presTable) resize(size int) {
	keys, vals := t.keys, t.vals
	t.keys, t.vals, t.n = make([]uint64, size), make([]uint32, size), 0
	t.shared.Store(false)
	for i, k := range keys {
		if k != 0 {
			j, _ := t.find(k)
			t.keys[j], t.vals[j] = k, vals[i]
			t.n++
		}
	}
}

// known returns chunk c's cached preserved epoch; ok is false when it is
// unknown (look it up in the tree).
func (p *presCache) known(c uint64) (uint32, bool) {
	if e, ok := p.t[c%nStripes].get(c/nStripes + 1); ok {
		return e, true
	}
	return 0, p.zero.Load()
}

// set caches chunk c's preserved epoch, evicting another chunk of its
// stripe if the table is full.
func (p *presCache) set(c uint64, e uint32) {
	t := &p.t[c%nStripes]
	k := c/nStripes + 1
	if len(t.keys) > 0 {
		if i, ok := t.find(k); ok {
			t.own()
			t.vals[i] = e
			return
		}
	}
	t.own()
	if 4*(t.n+1) > 3*len(t.keys) { // keep a quarter empty: probes stay short
		if len(t.keys) < p.maxSlots {
			t.resize(max(presMinSlots, 2*len(t.keys)))
		} else {
			p.evict(t)
		}
	}
	i, _ := t.find(k)
	t.keys[i], t.vals[i] = k, e
	t.n++
}

// evict drops one entry of t, the next occupied slot from its hand (a
// cheap round robin: a lookup in the tree is the price of a wrong guess).
func (p *presCache) evict(t *presTable) {
	p.zero.Store(false) // an absent chunk may now be one that held an epoch
	mask := len(t.keys) - 1
	for t.keys[t.hand&mask] == 0 {
		t.hand++
	}
	t.remove(t.hand & mask)
	t.hand++
}

// raise raises chunk c's cached epoch to e (an origin put at e was
// applied). An unknown chunk stays unknown: the tree has the put.
func (p *presCache) raise(c uint64, e uint32) {
	t := &p.t[c%nStripes]
	if t.n > 0 {
		if i, ok := t.find(c/nStripes + 1); ok {
			if t.vals[i] < e {
				t.own()
				t.vals[i] = e
			}
			return
		}
	}
	if p.zero.Load() && e > 0 {
		p.set(c, e)
	}
}

// forget drops every cached epoch: they are unknown until looked up.
func (p *presCache) forget() {
	p.zero.Store(false)
	for i := range p.t {
		p.t[i] = presTable{}
	}
}

// clone copies the cache for Check, which reads the copy without the
// locks and never changes it. The copy shares the tables' arrays, and
// each table copies its own before its next change (presTable.own): a
// copy of the whole cache (6.5 MB at the default MetadataCache) took
// milliseconds under Store.mu, which the writer waited for
// (docs/metadata.md section 24); a table costs its first change after a
// Check a copy of one stripe's share. Called with Store.mu held
// exclusively (or shared, on a store that cannot commit: then nothing
// changes the cache, and the marks race with nothing).
func (p *presCache) clone() *presCache {
	q := &presCache{maxSlots: p.maxSlots}
	q.zero.Store(p.zero.Load())
	for i := range p.t {
		t := &p.t[i]
		if len(t.keys) > 0 {
			t.shared.Store(true)
		}
		q.t[i] = presTable{keys: t.keys, vals: t.vals, n: t.n}
	}
	return q
}

// forgetPreserved marks every chunk's preserved epoch unknown (Open).
func (s *Store) forgetPreserved() { s.pres.forget() }

// anyUnknown reports whether a preserved epoch of [c0, c1] is unknown.
// Called with the chunks' origin stripes held.
func (s *Store) anyUnknown(c0, c1 uint64) bool {
	for c := c0; c <= c1; c++ {
		if _, ok := s.pres.known(c); !ok {
			return true
		}
	}
	return false
}

// resolvePreserved caches the preserved epochs of [c0, c1], looking up
// the unknown ones, so that the copy-on-write that follows finds each.
// Called with their origin stripes held exclusively (fewer than nStripes
// chunks, so no two share a stripe and caching one evicts none of the
// others); takes Store.mu (both locks guard the cache) only when one is
// unknown. The lookups read no page under Store.mu: one that misses the
// metadata cache releases it, loads what it missed and tries again, as a
// read's resolution does (volumeio.go). Once the preserved-epoch cache has
// evicted (an origin of more chunks than it holds), every first write to a
// chunk it does not hold looks up the tree here; with the tree larger than
// the metadata cache, most of those lookups missed and read a page under
// Store.mu.
//
// A chunk known only through presZero (absent since Format, so 0) is not
// cached here: that took Store.mu a second time on every first write
// after Format, beside the copy-on-write's own record, for an entry the
// record's put caches anyway (presCache.raise). If an eviction elsewhere
// clears presZero before the copy, the chunk reads as unknown; its epoch
// is still 0 (its stripe is held, so no one else copied it), so
// copyOut's copy is right, and the caller's next resolvePreserved looks
// it up.
func (s *Store) resolvePreserved(c0, c1 uint64) error {
	known := true
	for c := c0; c <= c1 && known; c++ {
		_, known = s.pres.known(c)
	}
	if known {
		return nil
	}
	for loads := 0; ; loads++ {
		s.mu.Lock()
		ix := s.ix
		ix.noRead = loads < maxReadLoads
		err := s.resolvePreservedLocked(ix, c0, c1)
		s.mu.Unlock()
		nc := notCached(err)
		if nc == nil {
			return err
		}
		// Load what the lookup walks, with no store lock held; an error
		// is met again by the next try.
		_, _, _, _ = s.m.Prev(nc.Key)
	}
}

// resolvePreservedLocked is resolvePreserved's work under Store.mu, its
// lookups through ix: with ix.noRead, a lookup that needs a page returns
// *meta.NotCachedError, the chunks before it cached.
func (s *Store) resolvePreservedLocked(ix pagedIndex, c0, c1 uint64) error {
	for c := c0; c <= c1; c++ {
		if _, ok := s.pres.t[c%nStripes].get(c/nStripes + 1); ok {
			continue
		}
		e, ok := s.pres.known(c) // 0 since Format
		if !ok {
			var err error
			e, err = preservedLookup(ix, c)
			if errors.Is(err, ErrClosed) {
				return err // a write that raced Close: nothing failed
			}
			if notCached(err) != nil {
				return err // only with ix.noRead
			}
			if err != nil {
				return s.fail(err)
			}
		}
		s.pres.set(c, e)
	}
	return nil
}

// preservedLookup reads origin chunk c's preserved epoch from the index
// ix. Called with Store.mu held.
func preservedLookup(ix pagedIndex, c uint64) (uint32, error) {
	x, ok, err := ix.last(0, c)
	if nc := notCached(err); nc != nil {
		return 0, nc // unwrapped, as resolveWith returns it
	}
	if err != nil {
		return 0, metaErr(fmt.Sprintf("origin chunk %d's preserved epoch", c), err)
	}
	if !ok {
		return 0, nil
	}
	return x.e, nil
}

// preservedOf returns chunk c's preserved epoch, looking it up without
// keeping it when unknown (the caller may not hold c's stripe). Called
// with Store.mu held.
func (s *Store) preservedOf(c uint64) (uint32, error) {
	if e, ok := s.pres.known(c); ok {
		return e, nil
	}
	return preservedLookup(s.ix, c)
}

// markCovered sets the chunk-group bits of a put that the tree's last
// commit already holds (Replay of a record up to treeSeq): the checkpoint
// image the bits come from may be older than that commit.
func (s *Store) markCovered(o *op, seq uint64) error {
	br := s.branches[o.b]
	if br == nil || o.n == 0 || o.c+o.n > s.chunkBound(o.b) || o.c+o.n < o.c {
		return fmt.Errorf("%w: record %d: put of chunks %d+%d on branch %d", ErrCorrupt, seq, o.c, o.n, o.b)
	}
	markGroups(br, o.c, o.n)
	return nil
}
