package clone

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ErrLocked is returned by Create and Open when the destination or the
// metadata device is locked by another user: another process (a running
// hydrate), or another Clone of the same devices in this one. errors.As
// gives a *blockdev.LockedError naming the device and, where the system
// says (Linux), the pid holding it.
var ErrLocked = blockdev.ErrLocked

// lockDevices locks the metadata device and then the destination, each
// exclusively (shared for a read-only open, so that inspections run side
// by side but never beside a writer), as the snapshot store locks its
// devices. Devices that are not blockdev.Lockers (a Slice, an NBD client)
// are not locked. The source is not locked: it is only read, and is often
// remote.
func lockDevices(dst, meta blockdev.Device, readOnly bool) (func(), error) {
	mode := blockdev.LockExclusive
	if readOnly {
		mode = blockdev.LockShared
	}
	relMeta, err := blockdev.LockDevice(meta, mode)
	if err != nil {
		return nil, fmt.Errorf("clone: metadata device: %w", err)
	}
	if dst == meta { // one device, one lock (a second Lock of it fails)
		return func() { _ = relMeta() }, nil
	}
	relDst, err := blockdev.LockDevice(dst, mode)
	if err != nil {
		_ = relMeta()
		return nil, fmt.Errorf("clone: destination device: %w", err)
	}
	return func() { _ = relDst(); _ = relMeta() }, nil
}

// withLocks locks the devices and runs open (create or open), handing the
// locks to the clone it returns, or releasing them if it fails.
func withLocks(src, dst, meta blockdev.Device, opts Options, open func(src, dst, meta blockdev.Device, opts Options) (*Clone, error)) (*Clone, error) {
	unlock, err := lockDevices(dst, meta, opts.ReadOnly)
	if err != nil {
		return nil, err
	}
	c, err := open(src, dst, meta, opts)
	if err != nil {
		unlock()
		return nil, err
	}
	c.unlock = unlock
	return c, nil
}
