package snapshot

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Protection and dependants.
//
// A volume's dependants are the volumes that read through it: for a
// snapshot, the clones made from it, and in turn their snapshots and
// clones; for a clone, its snapshots and theirs. Protect marks a snapshot
// or clone so that no delete takes it (one record, persisted in the
// checkpoint). Delete and DeleteWith refuse a protected volume, and a
// snapshot with dependants unless asked to go recursively (dependants
// first) or to detach (the snapshot stays as a hidden parent point until
// its last clone goes).

var (
	// ErrProtected is returned by a delete of a protected volume.
	ErrProtected = errors.New("snapshot: volume is protected")
	// ErrHasDependants is returned by a plain DeleteWith of a snapshot that
	// clones depend on.
	ErrHasDependants = errors.New("snapshot: volume has dependants")
)

// DependantsError is the error of a refused delete: it wraps ErrProtected
// (Protected set: Name itself, or the dependant Blocker of a recursive
// delete, is protected) or ErrHasDependants, and lists the dependants by
// name, deepest first.
type DependantsError struct {
	Name       string
	Protected  bool
	Blocker    string // the protected volume, when Protected
	Dependants []string
}

func (e *DependantsError) Error() string {
	deps := "none"
	if len(e.Dependants) > 0 {
		deps = strings.Join(e.Dependants, ", ")
	}
	switch {
	case e.Protected && e.Blocker == e.Name:
		return fmt.Sprintf("%v: %q is protected (dependants: %s)", ErrProtected, e.Name, deps)
	case e.Protected:
		return fmt.Sprintf("%v: %q, a dependant of %q, is protected (dependants of %q: %s)", ErrProtected, e.Blocker, e.Name, e.Name, deps)
	}
	return fmt.Sprintf("%v: %q has dependants: %s", ErrHasDependants, e.Name, deps)
}

func (e *DependantsError) Unwrap() error {
	if e.Protected {
		return ErrProtected
	}
	return ErrHasDependants
}

// DeleteOptions says what a delete does with a volume's dependants.
type DeleteOptions struct {
	// Recursive deletes the dependants first, deepest first. A protected
	// dependant refuses the whole delete before anything is deleted.
	Recursive bool
	// Detach lets a snapshot with clones go as a hidden parent point that
	// its clones keep (see ListAll) instead of refusing.
	Detach bool
}

// Protect marks the named snapshot or clone so that deletes refuse it.
func (s *Store) Protect(name string) error { return s.setProtected(name, true) }

// Unprotect lifts Protect.
func (s *Store) Unprotect(name string) error { return s.setProtected(name, false) }

func (s *Store) setProtected(name string, on bool) error {
	if err := s.writable(); err != nil {
		return err
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if err := s.makeLogRoom(); err != nil {
		return err
	}
	s.mu.Lock()
	id, ok := s.byName[name]
	switch {
	case !ok:
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	case id == originVolumeID:
		s.mu.Unlock()
		return fmt.Errorf("%w: the origin cannot be deleted, so it needs no protection", ErrBadOptions)
	case s.volumes[id].protected == on:
		s.mu.Unlock()
		return nil
	}
	sc.ops = append(sc.ops, op{kind: opProtect, id: id, on: on})
	_, err := s.logLocked(sc)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	return s.commit(s.ctx)
}

// DeleteWith deletes the named snapshot or clone as opts says. Without
// options, a protected volume and a snapshot with dependants are refused
// with a *DependantsError. With Recursive, the dependants are deleted
// first (each as Delete does), then the volume; the DeleteOp returned
// tracks the named volume's own reclaim (WaitIdle waits for the
// dependants' too, and for the hidden point a snapshot stays as until
// its clones' branches are collected).
func (s *Store) DeleteWith(name string, opts DeleteOptions) (*DeleteOp, error) {
	if !opts.Recursive {
		return s.deleteOne(name, opts)
	}
	s.mu.RLock()
	id, ok := s.byName[name]
	var deps []*volume
	var derr error
	if ok {
		v := s.volumes[id]
		deps = s.dependantsLocked(v)
		derr = s.refuseLocked(v, deps, opts)
	}
	s.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if derr != nil {
		return nil, derr
	}
	for _, d := range deps {
		if _, err := s.deleteOne(d.name, DeleteOptions{Detach: true}); err != nil {
			return nil, fmt.Errorf("snapshot: recursive delete of %q: dependant %q: %w", name, d.name, err)
		}
	}
	// The clones just deleted hold the snapshot's epoch until the
	// collector drops their branches: it goes as a hidden point meanwhile.
	return s.deleteOne(name, DeleteOptions{Detach: true})
}

// refuseLocked returns the DependantsError that refuses deleting v with
// deps as its dependants, or nil. Called with mu held.
func (s *Store) refuseLocked(v *volume, deps []*volume, opts DeleteOptions) error {
	names := make([]string, len(deps))
	for i, d := range deps {
		names[i] = d.name
	}
	e := &DependantsError{Name: v.name, Dependants: names}
	if v.protected {
		e.Protected, e.Blocker = true, v.name
		return e
	}
	if opts.Recursive {
		for _, d := range deps {
			if d.protected {
				e.Protected, e.Blocker = true, d.name
				return e
			}
		}
		return nil
	}
	if v.kind == KindSnapshot && len(deps) > 0 && !opts.Detach {
		return e
	}
	return nil
}

// dependantsLocked lists v's visible dependants, deepest first: each
// snapshot after the clones made from it, each clone after its
// snapshots. Hidden parent points are walked through, not listed. Called
// with mu held.
func (s *Store) dependantsLocked(v *volume) []*volume {
	byBranch := map[uint32][]*volume{}
	for _, x := range s.volumes {
		byBranch[x.branch] = append(byBranch[x.branch], x)
	}
	for _, vs := range byBranch {
		slices.SortFunc(vs, func(a, b *volume) int { return int(int64(a.id) - int64(b.id)) })
	}
	var out []*volume
	var ofPoint func(b, e uint32)
	var ofBranch func(br *branch)
	ofPoint = func(b, e uint32) {
		for _, ch := range s.branches[b].children {
			if ch.parentEpoch == e {
				ofBranch(ch)
			}
		}
	}
	ofBranch = func(br *branch) {
		for _, x := range byBranch[br.id] {
			if x.kind == KindSnapshot {
				ofPoint(br.id, x.epoch)
				if !x.hidden {
					out = append(out, x)
				}
			}
		}
		if br.liveVol != 0 {
			if x := s.volumes[br.liveVol]; x != nil {
				out = append(out, x)
			}
		}
	}
	switch v.kind {
	case KindSnapshot:
		ofPoint(v.branch, v.epoch)
	case KindClone:
		ofBranch(s.branches[v.branch])
		out = slices.DeleteFunc(out, func(x *volume) bool { return x == v })
	}
	return out
}

// Dependants returns the names of the named volume's dependants, deepest
// first: what a Recursive delete deletes before it.
func (s *Store) Dependants(name string) ([]string, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	id, ok := s.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	var out []string
	for _, d := range s.dependantsLocked(s.volumes[id]) {
		out = append(out, d.name)
	}
	return out, nil
}
