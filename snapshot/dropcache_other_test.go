//go:build !linux

package snapshot

import "os"

// dropCached does nothing where the kernel has no fadvise.
func dropCached(*os.File) error { return nil }
