package snapshot

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ErrLocked is returned by Format and Open when the store or origin device
// is locked by another user: another process, or another Store of this one
// on the same file. The error names the device and, where the system says
// (Linux), the pid holding it; errors.As gives a *blockdev.LockedError.
var ErrLocked = blockdev.ErrLocked

// deviceLocks are the releases of the locks a Store holds on its devices.
type deviceLocks []func() error

// lockDevices locks the store device and then the origin for a store that
// may change them: each exclusively, but shared where this store only
// reads it (Options.ReadOnly; a read-only origin, which several stores may
// share as their golden image). Devices that are not blockdev.Lockers
// (Slice, CrashSim) are not locked.
func lockDevices(origin, store blockdev.Device, readOnly bool) (deviceLocks, error) {
	mode := func(ro bool) blockdev.LockMode {
		if ro {
			return blockdev.LockShared
		}
		return blockdev.LockExclusive
	}
	var l deviceLocks
	release, err := blockdev.LockDevice(store, mode(readOnly))
	if err != nil {
		if readOnly {
			err = liveWriterErr(err) // livero.go
		}
		return nil, fmt.Errorf("snapshot: store device: %w", err)
	}
	l = append(l, release)
	release, err = blockdev.LockDevice(origin, mode(readOnly || blockdev.IsReadOnly(origin)))
	if err != nil {
		l.release()
		return nil, fmt.Errorf("snapshot: origin device: %w", err)
	}
	return append(l, release), nil
}

// release releases every lock, the last taken first. Errors are dropped:
// each lock also goes when its device is closed, and Close has already
// made everything durable.
func (l deviceLocks) release() {
	for i := len(l) - 1; i >= 0; i-- {
		_ = l[i]()
	}
}

// releaseLocks releases the devices' locks at Close.
func (s *Store) releaseLocks() {
	s.locks.release()
	s.locks = nil
}

// withLocks locks the devices and runs open (formatStore or openStore),
// handing the locks to the store it returns, or releasing them if it
// fails.
func withLocks(origin, store blockdev.Device, opts Options, open func(origin, store blockdev.Device, opts Options) (*Store, error)) (*Store, error) {
	l, err := lockDevices(origin, store, opts.ReadOnly)
	if err != nil {
		return nil, err
	}
	opts.storeFlock = storeFlockable(store)
	s, err := open(origin, store, opts)
	if err != nil {
		l.release()
		return nil, err
	}
	s.locks = l
	s.originRO = blockdev.IsReadOnly(origin)
	return s, nil
}

// Format creates a new, empty store for origin on store and returns it
// open. The origin's contents are kept (they are the live volume); whatever
// the store held is lost.
//
// Format and Open lock the devices that implement blockdev.Locker (File,
// URing, Mem, and ReadOnly views of them): the store device, and the origin,
// exclusively, so that a second Format or Open of the same devices, in this
// process or another, fails with ErrLocked until Close. A read-only store
// (Options.ReadOnly) takes shared locks, so inspections may run side by
// side but never beside a writer. A read-only origin (one that
// blockdev.IsReadOnly reports) is locked shared as well: it is a golden
// image that stores on several store devices may share. Its volume's
// writes, discards and rollbacks fail with ErrReadOnly; snapshots and
// clones of it work.
//
// A nil origin makes a store without one, a pool of volumes made by
// CreateVolume and Import: it has no "origin" volume, and Open must be
// given nil too.
func Format(origin, store blockdev.Device, opts Options) (*Store, error) {
	return withLocks(originOrNone(origin), store, opts, formatStore)
}

// Open opens a store made by Format, recovering from the journal. It
// locks the devices as Format does (ErrLocked while another Store has
// them).
func Open(origin, store blockdev.Device, opts Options) (*Store, error) {
	return withLocks(originOrNone(origin), store, opts, openStore)
}

// errReadOnlyOrigin is what a write to a read-only origin returns.
var errReadOnlyOrigin = fmt.Errorf("%w: the origin device is read-only (a golden image: clone it to write)", ErrReadOnly)

// originWritable fails when the origin device refuses writes.
func (s *Store) originWritable() error {
	if s.originRO {
		return errReadOnlyOrigin
	}
	return nil
}

// ReadOnly implements blockdev.ReadOnlyReporter: a snapshot, every volume
// of a store opened with Options.ReadOnly, and the origin volume of a
// read-only origin device refuse writes.
func (v *Volume) ReadOnly() bool {
	return v.kind == KindSnapshot || v.s.opts.ReadOnly || (v.kind == KindOrigin && v.s.originRO)
}
