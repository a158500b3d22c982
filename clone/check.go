package clone

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Check verifies the clone's invariants, as bbolt's Tx.Check does; tests
// run it after every recovery. It re-reads the superblock and checks it
// against the geometry in use and the devices, and checks that the in-core
// bitmaps agree with each other and with the journal:
//   - no bit beyond the last region; the counters match the bitmaps;
//   - every region the journal holds as hydrated (appended records, and what
//     Open recovered) is hydrated in memory, and every hydrated region is
//     either in the journal or waiting for the next commit;
//   - the journal's last sequence is the last one this clone appended;
//   - no region is both hydrated and claimed by a copy in flight;
//   - Done is closed exactly when every region is hydrated.
func (c *Clone) Check() error {
	if !c.enter() {
		return errClosed("check")
	}
	defer c.leave()
	sb := blockdev.AlignedBuffer(superArea)
	if _, err := c.meta.ReadAt(sb, 0); err != nil {
		return fmt.Errorf("clone: check: read superblock: %w", err)
	}
	g, err := decodeSuperblock(sb, c.meta.Size())
	if err != nil {
		return fmt.Errorf("clone: check: %w", err)
	}
	if g != c.geo {
		return corruptf("check: superblock %+v differs from the geometry in use %+v", g, c.geo)
	}
	if err := checkGeometry(g, c.src, c.dst, Options{}); err != nil {
		return fmt.Errorf("clone: check: %w", err)
	}

	m := c.md
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	c.io.Lock()
	defer c.io.Unlock()
	m.mu.RLock()
	defer m.mu.RUnlock()
	m.durMu.Lock()
	defer m.durMu.Unlock()

	n := uint(m.regions)
	for name, bm := range map[string]interface {
		NextSet(uint) (uint, bool)
	}{"hydrated": m.hydrated, "dirty": m.dirty, "durable": m.durable} {
		if i, ok := bm.NextSet(n); ok {
			return corruptf("check: %s bit %d set beyond %d regions", name, i, n)
		}
	}
	if got := uint64(m.hydrated.Count()); got != m.count {
		return corruptf("check: %d regions hydrated, counter says %d", got, m.count)
	}
	if got := uint64(m.dirty.Count()); got != m.dirtyN {
		return corruptf("check: %d regions dirty, counter says %d", got, m.dirtyN)
	}
	if !m.hydrated.IsSuperSet(m.durable) {
		return corruptf("check: regions in the journal are not hydrated: %v", m.durable.Difference(m.hydrated))
	}
	if !m.hydrated.IsSuperSet(m.dirty) {
		return corruptf("check: dirty regions are not hydrated")
	}
	if m.recovered != nil && !m.hydrated.IsSuperSet(m.recovered) {
		return corruptf("check: recovered regions are no longer hydrated")
	}
	if lost := m.hydrated.Difference(m.durable).Difference(m.dirty); lost.Any() {
		return corruptf("check: %d hydrated regions neither in the journal nor waiting for a commit", lost.Count())
	}
	if js := m.j.LastSeq(); js != m.lastSeq {
		return corruptf("check: journal's last sequence %d, clone appended up to %d", js, m.lastSeq)
	}
	for r := range c.io.flights {
		if m.hydrated.Test(uint(r)) {
			return corruptf("check: region %d hydrated while claimed", r)
		}
		if r >= m.regions {
			return corruptf("check: claim on region %d beyond %d", r, m.regions)
		}
	}
	all := m.count == m.regions
	if m.all.Load() != all {
		return corruptf("check: all-hydrated flag %v with %d of %d regions", m.all.Load(), m.count, m.regions)
	}
	select {
	case <-m.done:
		if !all {
			return corruptf("check: done before every region is hydrated")
		}
	default:
		if all {
			return corruptf("check: every region hydrated but not done")
		}
	}
	return nil
}
