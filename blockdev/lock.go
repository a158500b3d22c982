package blockdev

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// ErrLocked is returned when a device's lock is held by another user: another
// process, another handle on the same file in this process, or this very
// handle already.
var ErrLocked = errors.New("blockdev: device is locked by another user")

// LockedError is what Lock returns for a lock held elsewhere; it matches
// ErrLocked.
type LockedError struct {
	Path string   // the device's path
	Mode LockMode // the mode asked for
	// Holders are the processes holding the lock, where the system says
	// (Linux: /proc/locks); it may hold this process's own pid (another
	// handle on the file here).
	Holders []int
	// ThisHandle: the handle Lock was called on holds it already.
	ThisHandle bool
}

func (e *LockedError) Error() string {
	if e.ThisHandle {
		return fmt.Sprintf("blockdev: %s is already locked through this handle", e.Path)
	}
	msg := fmt.Sprintf("blockdev: %s is locked by another user", e.Path)
	if len(e.Holders) == 0 {
		return msg
	}
	self := os.Getpid()
	pids := make([]string, len(e.Holders))
	for i, p := range e.Holders {
		pids[i] = fmt.Sprintf("pid %d", p)
		if p == self {
			pids[i] += " (this process)"
		}
	}
	return msg + " (held by " + strings.Join(pids, ", ") + ")"
}

// Is makes errors.Is(err, ErrLocked) true.
func (e *LockedError) Is(target error) bool { return target == ErrLocked }

// LockMode says how a Locker's lock is taken.
type LockMode uint8

const (
	// LockExclusive excludes every other holder, shared or exclusive: a
	// user that may write the device.
	LockExclusive LockMode = iota
	// LockShared admits other shared holders and excludes an exclusive
	// one: a user that only reads the device.
	LockShared
)

func (m LockMode) String() string {
	if m == LockShared {
		return "shared"
	}
	return "exclusive"
}

// Locker is implemented by devices that can be locked against a second
// user, so that two programs (or two parts of one) never drive one store
// at once. File implements it with flock(2) on its descriptor, which other
// processes see (and which the kernel drops if the process dies); URing
// through its File, and the ReadOnly view through its parent. Mem, which
// lives in one process, keeps its lock in memory. Slice does not implement
// it: slices of one device may be used by different users.
//
// The lock is advisory: it only excludes other users that lock too.
type Locker interface {
	// Lock takes the lock without waiting. A lock held elsewhere fails
	// with an error wrapping ErrLocked that names the device and, where
	// the system says, the process holding it. Taking it twice through
	// the same handle fails the same way (it is not reentrant). A
	// device that cannot be locked (a ReadOnly view of a device that is
	// not a Locker) returns ErrNotSupported.
	Lock(mode LockMode) error
	// Unlock releases the lock taken by Lock. Closing the device
	// releases it too.
	Unlock() error
}

// LockDevice takes dev's lock in mode when dev is a Locker, and returns the
// function that releases it. A device that is not a Locker, or cannot be
// locked, is not locked, and its release does nothing.
func LockDevice(dev Device, mode LockMode) (release func() error, err error) {
	l, ok := dev.(Locker)
	if !ok {
		return func() error { return nil }, nil
	}
	if err := l.Lock(mode); err != nil {
		if errors.Is(err, ErrNotSupported) {
			return func() error { return nil }, nil
		}
		return nil, err
	}
	return l.Unlock, nil
}

// Lock implements Locker with flock(2) (on systems without it, it only
// excludes a second Lock through this handle).
func (d *File) Lock(mode LockMode) error {
	d.lockMu.Lock()
	defer d.lockMu.Unlock()
	if d.closed.Load() {
		return ErrClosed
	}
	if d.locked {
		return &LockedError{Path: d.path, Mode: mode, ThisHandle: true}
	}
	if err := flock(d.f, mode); err != nil {
		if errors.Is(err, ErrLocked) {
			return &LockedError{Path: d.path, Mode: mode, Holders: lockHolders(d.f)}
		}
		return fmt.Errorf("blockdev: lock %s: %w", d.path, err)
	}
	d.locked = true
	return nil
}

// Unlock implements Locker.
func (d *File) Unlock() error {
	d.lockMu.Lock()
	defer d.lockMu.Unlock()
	if !d.locked {
		return nil
	}
	d.locked = false
	if d.closed.Load() {
		return nil // closing the descriptor released it
	}
	if err := funlock(d.f); err != nil {
		return fmt.Errorf("blockdev: unlock %s: %w", d.path, err)
	}
	return nil
}

// Lock implements Locker through the parent device.
func (r *ReadOnlyDevice) Lock(mode LockMode) error {
	if r.closed.Load() {
		return ErrClosed
	}
	if l, ok := r.dev.(Locker); ok {
		return l.Lock(mode)
	}
	return fmt.Errorf("blockdev: lock of a read-only view: %w", ErrNotSupported)
}

// Unlock implements Locker through the parent device.
func (r *ReadOnlyDevice) Unlock() error {
	if l, ok := r.dev.(Locker); ok {
		return l.Unlock()
	}
	return nil
}

// Lock implements Locker within this process: a Mem lives in one process,
// so its lock keeps out a second user there (two stores opened on one Mem).
// Shared locks count; Unlock releases an exclusive lock, or one shared.
func (m *Mem) Lock(mode LockMode) error {
	m.lockMu.Lock()
	defer m.lockMu.Unlock()
	if m.closed.Load() {
		return ErrClosed
	}
	if m.exclusive || (mode == LockExclusive && m.shared > 0) {
		return &LockedError{Path: "memory device", Mode: mode, Holders: []int{os.Getpid()}}
	}
	if mode == LockExclusive {
		m.exclusive = true
	} else {
		m.shared++
	}
	return nil
}

// Unlock implements Locker.
func (m *Mem) Unlock() error {
	m.lockMu.Lock()
	defer m.lockMu.Unlock()
	if m.exclusive {
		m.exclusive = false
	} else if m.shared > 0 {
		m.shared--
	}
	return nil
}
