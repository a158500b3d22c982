package exception

import "github.com/blocksnap/blocksnap/blockdev"

// Status describes a snapshot's store, in the kernel's terms (dmsetup
// status shows used/total sectors and metadata sectors; we count chunks).
type Status struct {
	State      State
	Persistent bool
	ChunkSize  int64 // bytes
	// TotalChunks is the COW device's size in chunks.
	TotalChunks uint64
	// UsedChunks counts the chunks allocated so far, header and metadata
	// areas included for a persistent store (the kernel's next_free).
	UsedChunks uint64
	// MetadataChunks counts the header and the metadata areas in use.
	MetadataChunks uint64
	// Exceptions counts the chunks the snapshot holds.
	Exceptions uint64
	// Err is why the snapshot is invalid, if it is.
	Err error
}

// Status returns the snapshot's status.
func (s *Snapshot) Status() Status {
	u := s.st.usage()
	return Status{State: s.State(), Persistent: s.persistent, ChunkSize: s.cs, TotalChunks: u.total,
		UsedChunks: u.used, MetadataChunks: u.metadata, Exceptions: u.exceptions, Err: u.invalid}
}

// CheckReport is what Check counted, and every problem it found.
type CheckReport struct {
	// Problems lists every inconsistency, one line each.
	blockdev.CheckReport
	Exceptions uint64
	// DataChunks counts the COW chunks allocated for data below the
	// allocation cursor.
	DataChunks uint64
	// Leaked counts allocated data chunks that no exception points at and
	// no copy in flight owns. Stores this package writes never leak; a
	// kernel-written store can (it commits out of order).
	Leaked uint64
	// InFlight counts reservations not yet committed.
	InFlight uint64
}

// Check verifies the snapshot's invariants: every exception's COW chunk is
// within the COW device, not metadata, and used once; no origin chunk has
// two exceptions; the lookup table and the store agree; for a persistent
// store, the metadata on the COW device decodes to exactly the exceptions
// in memory. It counts leaked chunks. Run it while no I/O is in flight (it
// is meant for tests and after recovery). An invalid snapshot is checked
// for its on-disk header only. The error is nil when the report lists no
// problem, else a *blockdev.CheckError wrapping ErrCorrupt with all of them.
// Check writes nothing. (CheckCOW checks a COW device without an origin.)
func (s *Snapshot) Check() (CheckReport, error) {
	u := s.st.usage()
	rep := CheckReport{Exceptions: u.exceptions, InFlight: u.inFlight}
	p, persistent := s.st.(*persistent)
	if u.invalid != nil {
		if persistent {
			img, err := LoadPersistent(p.dev)
			switch {
			case err != nil:
				rep.Addf("%v", err)
			case img.Valid:
				rep.Addf("the snapshot is invalid but its header says valid")
			}
		}
		return rep, rep.Err(ErrCorrupt)
	}
	s.st.entries(func(list []Exception) {
		s.checkList(list, &rep, u)
	})
	if persistent {
		p.checkDisk(&rep)
	}
	return rep, rep.Err(ErrCorrupt)
}

func (s *Snapshot) checkList(list []Exception, rep *CheckReport, u storeUsage) {
	if uint64(len(list)) != u.exceptions {
		rep.Addf("%d exceptions listed, %d counted", len(list), u.exceptions)
	}
	originChunks := uint64((s.o.size + s.cs - 1) / s.cs)
	p, persistent := s.st.(*persistent)
	limit := u.total
	if persistent {
		limit = p.limit
	}
	olds := make(map[uint64]struct{}, len(list))
	news := make(map[uint64]struct{}, len(list))
	for i, e := range list {
		switch {
		case e.Old >= originChunks:
			rep.Addf("exception %d: origin chunk %d beyond %d", i, e.Old, originChunks)
		case e.New >= limit:
			rep.Addf("exception %d: COW chunk %d beyond %d", i, e.New, limit)
		case persistent && isAreaChunk(e.New, p.epa):
			rep.Addf("exception %d: COW chunk %d is metadata", i, e.New)
		}
		if _, dup := olds[e.Old]; dup {
			rep.Addf("origin chunk %d has two exceptions", e.Old)
		}
		if _, dup := news[e.New]; dup {
			rep.Addf("COW chunk %d used twice", e.New)
		}
		olds[e.Old], news[e.New] = struct{}{}, struct{}{}
		if got, ok := s.tab.get(e.Old); !ok || got != e.New {
			rep.Addf("exception %d->%d missing from the lookup table", e.Old, e.New)
		}
	}
	if n := s.tab.count(); n != len(list) {
		rep.Addf("lookup table holds %d exceptions, store %d", n, len(list))
	}
	// Leaks: data chunks below the cursor that nothing accounts for.
	if persistent {
		for x := uint64(2); x < u.used && x < p.devChunks; x++ {
			if !isAreaChunk(x, p.epa) {
				rep.DataChunks++
			}
		}
	} else {
		rep.DataChunks = u.used - u.merged
	}
	accounted := uint64(len(list)) + u.inFlight
	if rep.DataChunks < accounted {
		if persistent && s.State() == StateMerging || !persistent {
			return // a merge gives chunks back; the cursor is approximate
		}
		rep.Addf("%d exceptions and %d in flight but only %d data chunks allocated", len(list), u.inFlight, rep.DataChunks)
		return
	}
	rep.Leaked = rep.DataChunks - accounted
}

// checkDisk decodes the store on its device and compares it with memory.
func (p *persistent) checkDisk(rep *CheckReport) {
	img, err := LoadPersistent(p.dev)
	if err != nil {
		rep.Addf("%v", err)
		return
	}
	if !img.Valid {
		rep.Addf("header says invalid, the store is valid")
	}
	if img.ChunkSize != p.cs {
		rep.Addf("header chunk size %d, store %d", img.ChunkSize, p.cs)
	}
	p.entries(func(list []Exception) {
		if len(img.Entries) != len(list) {
			rep.Addf("%d exceptions on disk, %d in memory", len(img.Entries), len(list))
		}
		for i := range min(len(list), len(img.Entries)) {
			if img.Entries[i] != list[i] {
				rep.Addf("exception %d is %v on disk, %v in memory", i, img.Entries[i], list[i])
			}
		}
	})
}
