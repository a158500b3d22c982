//go:build unix

package blockdev

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// flock takes f's flock(2) lock without waiting; one held elsewhere is
// ErrLocked. flock locks belong to the open file description, so a second
// open of the same file, in this process or another, conflicts with it.
func flock(f *os.File, mode LockMode) error {
	how := unix.LOCK_EX
	if mode == LockShared {
		how = unix.LOCK_SH
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK):
			return ErrLocked
		}
		return err
	}
}

func funlock(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_UN)
}

// lockHolders returns the processes holding a flock on f's file, from
// /proc/locks where the system has it (nil when they cannot be found). The
// kernel lists each lock as "ID: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE
// START END", the device numbers in hex; lines with "->" are waiters, not
// holders.
func lockHolders(f *os.File) []int {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil
	}
	dev := uint64(st.Dev) // its type differs between systems
	key := fmt.Sprintf("%02x:%02x:%d", unix.Major(dev), unix.Minor(dev), st.Ino)
	pl, err := os.Open("/proc/locks")
	if err != nil {
		return nil
	}
	defer pl.Close()
	return holdersIn(bufio.NewScanner(pl), key)
}

// holdersIn scans /proc/locks lines for the flock holders of the file
// whose "MAJ:MIN:INODE" is key.
func holdersIn(sc *bufio.Scanner, key string) []int {
	var pids []int
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[5] != key {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}
