package snapshot

import (
	"os"

	"golang.org/x/sys/unix"
)

// dropCached drops f's clean pages from the kernel's page cache.
func dropCached(f *os.File) error {
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}
