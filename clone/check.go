package clone

import "github.com/blocksnap/blocksnap/blockdev"

// Check verifies the clone's invariants, as bbolt's Tx.Check does; tests
// run it after every recovery. It returns nil if all hold, else a
// *blockdev.CheckError wrapping ErrCorrupt that holds every problem found
// (CheckReport returns them as a list). It re-reads the superblock and
// checks it against the geometry in use and the devices, and checks that
// the in-core bitmaps agree with each other and with the journal:
//   - no bit beyond the last region; the counters match the bitmaps;
//   - every region the journal holds as hydrated (appended records, and what
//     Open recovered) is hydrated in memory, and every hydrated region is
//     either in the journal or waiting for the next commit;
//   - the journal's last sequence is the last one this clone appended;
//   - no region is both hydrated and claimed by a copy in flight;
//   - Done is closed exactly when every region is hydrated.
//
// On a clone opened with Options.ReadOnly it writes nothing.
func (c *Clone) Check() error {
	if !c.enter() {
		return errClosed("check")
	}
	defer c.leave()
	return c.checkReport().Err(ErrCorrupt)
}

// CheckReport runs the checks of Check and lists every problem found, one
// line each (an empty report: the clone is consistent). A closed clone
// reports that it is closed.
func (c *Clone) CheckReport() blockdev.CheckReport {
	if !c.enter() {
		var rep blockdev.CheckReport
		rep.Addf("%v", errClosed("check"))
		return rep
	}
	defer c.leave()
	return c.checkReport()
}

func (c *Clone) checkReport() blockdev.CheckReport {
	var rep blockdev.CheckReport
	c.checkSuperblock(&rep)

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
	for _, b := range []struct {
		name string
		bm   interface{ NextSet(uint) (uint, bool) }
	}{{"hydrated", m.hydrated}, {"dirty", m.dirty}, {"durable", m.durable}} {
		if i, ok := b.bm.NextSet(n); ok {
			rep.Addf("%s bit %d set beyond %d regions", b.name, i, n)
		}
	}
	if got := uint64(m.hydrated.Count()); got != m.count {
		rep.Addf("%d regions hydrated, counter says %d", got, m.count)
	}
	if got := uint64(m.dirty.Count()); got != m.dirtyN {
		rep.Addf("%d regions dirty, counter says %d", got, m.dirtyN)
	}
	if d := m.durable.Difference(m.hydrated); d.Any() {
		rep.Addf("%d regions in the journal are not hydrated (first %d)", d.Count(), first(d))
	}
	if d := m.dirty.Difference(m.hydrated); d.Any() {
		rep.Addf("%d dirty regions are not hydrated (first %d)", d.Count(), first(d))
	}
	if m.recovered != nil {
		if d := m.recovered.Difference(m.hydrated); d.Any() {
			rep.Addf("%d recovered regions are no longer hydrated (first %d)", d.Count(), first(d))
		}
	}
	if lost := m.hydrated.Difference(m.durable).Difference(m.dirty); lost.Any() {
		rep.Addf("%d hydrated regions neither in the journal nor waiting for a commit (first %d)", lost.Count(), first(lost))
	}
	if js := m.j.LastSeq(); js != m.lastSeq {
		rep.Addf("journal's last sequence %d, clone appended up to %d", js, m.lastSeq)
	}
	for r := range c.io.flights {
		if m.hydrated.Test(uint(r)) {
			rep.Addf("region %d hydrated while claimed", r)
		}
		if r >= m.regions {
			rep.Addf("claim on region %d beyond %d", r, m.regions)
		}
	}
	all := m.count == m.regions
	if m.all.Load() != all {
		rep.Addf("all-hydrated flag %v with %d of %d regions", m.all.Load(), m.count, m.regions)
	}
	select {
	case <-m.done:
		if !all {
			rep.Addf("done before every region is hydrated")
		}
	default:
		if all {
			rep.Addf("every region hydrated but not done")
		}
	}
	return rep
}

// checkSuperblock re-reads the superblock and compares it with the
// geometry in use and the devices.
func (c *Clone) checkSuperblock(rep *blockdev.CheckReport) {
	sb := blockdev.AlignedBuffer(superArea)
	if _, err := c.meta.ReadAt(sb, 0); err != nil {
		rep.Addf("read superblock: %v", err)
		return
	}
	g, err := decodeSuperblock(sb, c.meta.Size())
	if err != nil {
		rep.Addf("superblock: %v", err)
		return
	}
	if g != c.geo {
		rep.Addf("superblock %+v differs from the geometry in use %+v", g, c.geo)
	}
	if err := checkGeometry(g, c.src, c.dst, Options{}); err != nil {
		rep.Addf("%v", err)
	}
}

// first returns the lowest set bit of a non-empty set.
func first(b interface{ NextSet(uint) (uint, bool) }) uint {
	i, _ := b.NextSet(0)
	return i
}
