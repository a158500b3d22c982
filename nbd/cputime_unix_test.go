//go:build unix

package nbd

import (
	"syscall"
	"time"
)

// cpuTime is the CPU time (user and system) this process has used, for
// benchmarks that report CPU cost per operation: on a shared machine it
// varies far less with the load than elapsed time.
func cpuTime() (time.Duration, bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}
