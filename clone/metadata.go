package clone

import (
	"sync"
	"sync/atomic"

	"github.com/bits-and-blooms/bitset"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/journal"
)

// metadata is the clone's hydration state: the in-core bitmaps and the
// journal that persists them. The I/O path talks to it only through test,
// rangeHydrated, forEachUnhydrated, nextUnhydrated, markRange and flush,
// the narrow interface dm-clone keeps between its target and its metadata.
type metadata struct {
	regions uint64
	dst     blockdev.Device // flushed before every metadata write
	meta    blockdev.Device
	geo     geometry
	j       *journal.Journal
	nosync  bool

	bugOrder    bool   // test only: commit metadata, then flush the destination
	afterCommit func() // test only

	// mu guards the bitmaps below. Lock order: commitMu, Clone.io.mu, mu,
	// durMu.
	mu       sync.RWMutex
	hydrated *bitset.BitSet // the region's data is in the destination
	dirty    *bitset.BitSet // hydrated, not yet appended to the journal
	count    uint64         // hydrated.Count()
	dirtyN   uint64         // dirty.Count()
	all      atomic.Bool    // count == regions
	done     chan struct{}  // closed when count reaches regions

	// commitMu serialises commits (the only appenders); it guards spans.
	commitMu sync.Mutex
	spans    []span // reused by commit

	// durMu guards what a checkpoint captures: taken for short updates
	// after each Append and for the capture, never across I/O, so that a
	// checkpoint can run while a commit holds commitMu.
	durMu     sync.Mutex
	durable   *bitset.BitSet // regions appended to the journal: what a checkpoint holds
	lastSeq   uint64         // last journal sequence appended
	ckptSeq   uint64         // lastSeq at the last checkpoint
	unsynced  bool           // an unsynced session is open (recorded)
	recovered *bitset.BitSet // what Open recovered from the journal, for Check

	commits atomic.Int64
	failed  atomic.Pointer[error] // last metadata error, for Status

	// early asks the committer for a commit before its interval ends
	// (capacity 1): background hydration has written enough since the
	// last one that flushing it now keeps the next Flush short.
	early chan struct{}
}

func newMetadata(c *Clone, g geometry) *metadata {
	return &metadata{
		regions:     g.Regions,
		dst:         c.dst,
		meta:        c.meta,
		geo:         g,
		nosync:      c.opts.NoMetadataSync,
		bugOrder:    c.opts.testBugOrder,
		afterCommit: c.opts.testAfterCommit,
		hydrated:    bitset.New(uint(g.Regions)),
		dirty:       bitset.New(uint(g.Regions)),
		durable:     bitset.New(uint(g.Regions)),
		done:        make(chan struct{}),
		early:       make(chan struct{}, 1),
	}
}

// load installs a recovered bitmap.
func (m *metadata) load(bm *bitset.BitSet) {
	m.hydrated = bm
	m.durable = bm.Clone()
	m.recovered = bm.Clone()
	m.count = uint64(bm.Count())
	if m.count == m.regions {
		m.all.Store(true)
		close(m.done)
	}
}

// test reports whether region r is hydrated.
func (m *metadata) test(r uint64) bool {
	if m.all.Load() {
		return true
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.hydrated.Test(uint(r))
}

func (m *metadata) allHydrated() bool { return m.all.Load() }

// rangeHydrated reports whether every region of [r0, r1] is hydrated.
func (m *metadata) rangeHydrated(r0, r1 uint64) bool {
	if m.all.Load() {
		return true
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	i, ok := m.hydrated.NextClear(uint(r0))
	return !ok || uint64(i) > r1
}

// forEachUnhydrated calls fn for each unhydrated region of [r0, r1], under
// the read lock (fn must not call back into m).
func (m *metadata) forEachUnhydrated(r0, r1 uint64, fn func(r uint64)) {
	if m.all.Load() {
		return
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for i, ok := m.hydrated.NextClear(uint(r0)); ok && uint64(i) <= r1 && uint64(i) < m.regions; i, ok = m.hydrated.NextClear(i + 1) {
		fn(uint64(i))
	}
}

// nextUnhydrated returns the first unhydrated region at or after from.
func (m *metadata) nextUnhydrated(from uint64) (uint64, bool) {
	if m.all.Load() {
		return 0, false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	i, ok := m.hydrated.NextClear(uint(from))
	if !ok || uint64(i) >= m.regions {
		return 0, false
	}
	return uint64(i), true
}

// markRange makes every region of [r0, r1] hydrated and returns how many
// were not before. The newly hydrated ones are committed by the next
// commit; their data must already be in the destination (written, not
// necessarily flushed: the commit flushes it first).
func (m *metadata) markRange(r0, r1 uint64) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n uint64
	for i, ok := m.hydrated.NextClear(uint(r0)); ok && uint64(i) <= r1 && uint64(i) < m.regions; i, ok = m.hydrated.NextClear(i + 1) {
		m.hydrated.Set(i)
		m.dirty.Set(i)
		n++
	}
	m.count += n
	m.dirtyN += n
	if n > 0 && m.count == m.regions {
		m.all.Store(true)
		close(m.done)
	}
	return n
}

func (m *metadata) hydratedCount() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.count
}

func (m *metadata) pending() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.dirtyN
}

// takeDirty moves the dirty set into m.spans (sorted runs). Called with
// commitMu held.
func (m *metadata) takeDirty() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.spans = m.spans[:0]
	// Bits at or past regions are never set (markRange and the loaders
	// bound them); the loop stops there all the same, so a stray bit can
	// never turn into a span of 2^64 regions and a loop without end.
	for i, ok := m.dirty.NextSet(0); ok && uint64(i) < m.regions; {
		j, more := m.dirty.NextClear(i)
		if !more || uint64(j) > m.regions {
			j = uint(m.regions)
		}
		m.spans = append(m.spans, span{start: uint64(i), n: uint64(j - i)})
		i, ok = m.dirty.NextSet(j)
	}
	m.dirty.ClearAll()
	m.dirtyN = 0
}

// restoreDirty puts spans back into the dirty set after a failed commit,
// so that the next commit writes them again (replaying a range twice is
// harmless).
func (m *metadata) restoreDirty(spans []span) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range spans {
		m.dirty.SetRange(uint(s.start), uint(s.start+s.n))
	}
	m.dirtyN = uint64(m.dirty.Count())
}

func (m *metadata) setErr(err error) {
	if err != nil {
		m.failed.Store(&err)
	}
}

func (m *metadata) lastErr() error {
	if p := m.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// waitDone is closed when every region is hydrated.
func (m *metadata) waitDone() <-chan struct{} { return m.done }
