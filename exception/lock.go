package exception

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ErrLocked is returned by NewOrigin, CreateSnapshot and OpenSnapshot when
// the device is locked by another user (another Origin or Snapshot over the
// same file, in this process or another); the message names the holder's
// pid where the system says.
var ErrLocked = blockdev.ErrLocked

// lockDevice locks dev, when it is a blockdev.Locker, for as long as an
// Origin or Snapshot uses it: exclusively, as this package writes it, or
// shared when dev is read-only (then nothing here writes it, and readers
// may share it). It returns the release.
func lockDevice(what string, dev blockdev.Device) (func() error, error) {
	mode := blockdev.LockExclusive
	if blockdev.IsReadOnly(dev) {
		mode = blockdev.LockShared
	}
	release, err := blockdev.LockDevice(dev, mode)
	if err != nil {
		return nil, fmt.Errorf("exception: %s device: %w", what, err)
	}
	return release, nil
}
