//go:build !unix

package blockdev

import "os"

// flock cannot lock on this system: only a second Lock through the same
// handle is refused.
func flock(*os.File, LockMode) error { return nil }

func funlock(*os.File) error { return nil }

func lockHolders(*os.File) []int { return nil }
