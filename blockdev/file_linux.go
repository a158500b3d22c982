//go:build linux

package blockdev

import (
	"errors"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

const directFlag = unix.O_DIRECT

func datasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

func fallocate(f *os.File, mode uint32, off, n int64) error {
	for {
		err := unix.Fallocate(int(f.Fd()), mode, off, n)
		switch {
		case err == unix.EINTR:
			continue
		case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EINVAL):
			return ErrNotSupported
		}
		return err
	}
}

func punchHole(f *os.File, off, n int64) error {
	return fallocate(f, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func zeroRange(f *os.File, off, n int64) error {
	return fallocate(f, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// blockDeviceGeometry returns a block device node's size in bytes and its
// logical sector size.
func blockDeviceGeometry(f *os.File) (int64, int, error) {
	var size uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
		return 0, 0, e
	}
	sector, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
	if err != nil {
		return 0, 0, err
	}
	return int64(size), sector, nil
}

// seekMap returns the length of the run at off (at most n) and whether it is
// a hole, using SEEK_DATA and SEEK_HOLE. Where they are unsupported, the
// whole range is data.
func seekMap(f *os.File, off, n int64) (int64, bool) {
	fd := int(f.Fd())
	data, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err != nil {
		if err == unix.ENXIO { // no data at or after off
			return n, true
		}
		return n, false
	}
	if data > off {
		return min(data-off, n), true
	}
	hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil {
		return n, false
	}
	return min(hole-off, n), false
}
