//go:build unix

package snapshot

import (
	"errors"
	"syscall"
)

// pidAlive reports whether a process with this pid exists on this host
// (one of another user counts: it exists).
func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
