package exception

import (
	"errors"
	"fmt"
)

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

// CheckReport is what Check counted.
type CheckReport struct {
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
// for its on-disk header only.
func (s *Snapshot) Check() (CheckReport, error) {
	u := s.st.usage()
	rep := CheckReport{Exceptions: u.exceptions, InFlight: u.inFlight}
	if u.invalid != nil {
		if p, ok := s.st.(*persistent); ok {
			img, err := LoadPersistent(p.dev)
			if err != nil {
				return rep, fmt.Errorf("exception: check: %w", err)
			}
			if img.Valid {
				return rep, fmt.Errorf("%w: check: the snapshot is invalid but its header says valid", ErrCorrupt)
			}
		}
		return rep, nil
	}
	var err error
	s.st.entries(func(list []Exception) {
		err = s.checkList(list, &rep, u)
	})
	if err != nil {
		return rep, err
	}
	if p, ok := s.st.(*persistent); ok {
		return rep, p.checkDisk()
	}
	return rep, nil
}

func (s *Snapshot) checkList(list []Exception, rep *CheckReport, u storeUsage) error {
	if uint64(len(list)) != u.exceptions {
		return fmt.Errorf("%w: check: %d exceptions listed, %d counted", ErrCorrupt, len(list), u.exceptions)
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
			return fmt.Errorf("%w: check: exception %d: origin chunk %d beyond %d", ErrCorrupt, i, e.Old, originChunks)
		case e.New >= limit:
			return fmt.Errorf("%w: check: exception %d: COW chunk %d beyond %d", ErrCorrupt, i, e.New, limit)
		case persistent && isAreaChunk(e.New, p.epa):
			return fmt.Errorf("%w: check: exception %d: COW chunk %d is metadata", ErrCorrupt, i, e.New)
		}
		if _, dup := olds[e.Old]; dup {
			return fmt.Errorf("%w: check: origin chunk %d has two exceptions", ErrCorrupt, e.Old)
		}
		if _, dup := news[e.New]; dup {
			return fmt.Errorf("%w: check: COW chunk %d used twice", ErrCorrupt, e.New)
		}
		olds[e.Old], news[e.New] = struct{}{}, struct{}{}
		if got, ok := s.tab.get(e.Old); !ok || got != e.New {
			return fmt.Errorf("%w: check: exception %d->%d missing from the lookup table", ErrCorrupt, e.Old, e.New)
		}
	}
	if n := s.tab.count(); n != len(list) {
		return fmt.Errorf("%w: check: lookup table holds %d exceptions, store %d", ErrCorrupt, n, len(list))
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
			return nil // a merge gives chunks back; the cursor is approximate
		}
		return fmt.Errorf("%w: check: %d exceptions and %d in flight but only %d data chunks allocated", ErrCorrupt, len(list), u.inFlight, rep.DataChunks)
	}
	rep.Leaked = rep.DataChunks - accounted
	return nil
}

// checkDisk decodes the store on its device and compares it with memory.
func (p *persistent) checkDisk() error {
	img, err := LoadPersistent(p.dev)
	if err != nil {
		return fmt.Errorf("exception: check: %w", err)
	}
	if !img.Valid {
		return fmt.Errorf("%w: check: header says invalid, the store is valid", ErrCorrupt)
	}
	if img.ChunkSize != p.cs {
		return fmt.Errorf("%w: check: header chunk size %d, store %d", ErrCorrupt, img.ChunkSize, p.cs)
	}
	var errs []error
	p.entries(func(list []Exception) {
		if len(img.Entries) != len(list) {
			errs = append(errs, fmt.Errorf("%w: check: %d exceptions on disk, %d in memory", ErrCorrupt, len(img.Entries), len(list)))
			return
		}
		for i := range list {
			if img.Entries[i] != list[i] {
				errs = append(errs, fmt.Errorf("%w: check: exception %d is %v on disk, %v in memory", ErrCorrupt, i, img.Entries[i], list[i]))
				return
			}
		}
	})
	return errors.Join(errs...)
}
