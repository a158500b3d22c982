package blockdev

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"
)

// FileOptions configures Open. The zero value opens read-write, buffered,
// with the block size taken from the device node (or 4096 for a regular
// file).
type FileOptions struct {
	// ReadOnly opens the file read-only; writes fail with ErrReadOnly.
	ReadOnly bool
	// Direct opens with O_DIRECT (Linux): I/O bypasses the page cache.
	// Buffers that are not suitably aligned in memory are copied through
	// aligned buffers internally, so callers need not care.
	Direct bool
	// BlockSize is the logical block size, 512 or 4096. Zero means: the
	// device node's logical sector size, or 4096 for a regular file.
	BlockSize int
}

// File is a Device over a regular file or a block device node, using
// pread/pwrite. Flush is fdatasync; Discard punches a hole (regular files) or
// asks the device to discard (device nodes), and the range reads as zeros
// afterwards either way. A File works on a loop device exactly as on the file
// behind it.
type File struct {
	f       *os.File
	path    string
	size    int64
	bs      int
	ro      bool
	direct  bool
	isBlock bool
	closed  atomic.Bool
	// punch records whether hole punching still works; it is cleared the
	// first time the file system refuses it, after which Discard writes
	// zeros.
	punch atomic.Bool

	lockMu sync.Mutex // guards locked (Lock, Unlock); taken alone
	locked bool       // Lock holds the flock
}

// Create makes (or truncates) the regular file at path with the given size,
// sparse, and opens it read-write with opts.
func Create(path string, size int64, opts FileOptions) (*File, error) {
	bs := opts.BlockSize
	if bs == 0 {
		bs = 4096
	}
	if err := checkGeometry(size, bs); err != nil {
		return nil, fmt.Errorf("blockdev: create %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("blockdev: create: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdev: create %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("blockdev: create %s: %w", path, err)
	}
	opts.ReadOnly = false
	opts.BlockSize = bs
	return Open(path, opts)
}

// Open opens an existing regular file or block device node as a Device. The
// size is the file's size (rounded down to the block size) or the device's
// size (BLKGETSIZE64).
func Open(path string, opts FileOptions) (*File, error) {
	flags := os.O_RDWR
	if opts.ReadOnly {
		flags = os.O_RDONLY
	}
	if opts.Direct {
		if directFlag == 0 {
			return nil, fmt.Errorf("blockdev: open %s: O_DIRECT: %w", path, ErrNotSupported)
		}
		flags |= directFlag
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("blockdev: open: %w", err)
	}
	d := &File{f: f, path: path, ro: opts.ReadOnly, direct: opts.Direct}
	d.punch.Store(true)
	if err := d.probe(opts.BlockSize); err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdev: open %s: %w", path, err)
	}
	return d, nil
}

func (d *File) probe(bs int) error {
	st, err := d.f.Stat()
	if err != nil {
		return err
	}
	switch {
	case st.Mode().IsRegular():
		d.size = st.Size()
		if bs == 0 {
			bs = 4096
		}
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		d.isBlock = true
		size, sector, err := blockDeviceGeometry(d.f)
		if err != nil {
			return err
		}
		d.size = size
		if bs == 0 {
			bs = sector
			if bs != 512 {
				bs = 4096
			}
		}
		if bs < sector {
			return fmt.Errorf("%w: block size %d below the device's sector size %d", ErrMisaligned, bs, sector)
		}
	default:
		return fmt.Errorf("%w: %s is neither a regular file nor a block device", ErrNotSupported, st.Mode())
	}
	if bs != 512 && bs != 4096 {
		return fmt.Errorf("block size %d: must be 512 or 4096: %w", bs, ErrNotSupported)
	}
	d.bs = bs
	d.size -= d.size % int64(bs)
	return nil
}

func (d *File) check(off, n int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	return CheckRange(off, n, d.size, d.bs)
}

// directAlign is the memory alignment O_DIRECT buffers get.
const directAlign = 4096

// directChunk is the size of the aligned bounce buffers.
const directChunk = 1 << 20

var bouncePool = sync.Pool{New: func() any {
	b := AlignedBuffer(directChunk)
	return &b
}}

// AlignedBuffer returns a zeroed buffer of n bytes whose address is a
// multiple of 4096, as O_DIRECT needs.
func AlignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	shift := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (directAlign - 1))
	if shift != 0 {
		shift = directAlign - shift
	}
	return b[shift : shift+n : shift+n]
}

func aligned(p []byte) bool {
	return len(p) == 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))&(directAlign-1) == 0
}

// ReadAt implements Device.
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.direct && !aligned(p) {
		return d.bounce(p, off, false)
	}
	n, err := d.f.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("blockdev: read %s at %d: %w", d.path, off, err)
	}
	return n, nil
}

// WriteAt implements Device.
func (d *File) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.ro {
		return 0, fmt.Errorf("%w: %s", ErrReadOnly, d.path)
	}
	if d.direct && !aligned(p) {
		return d.bounce(p, off, true)
	}
	n, err := d.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("blockdev: write %s at %d: %w", d.path, off, err)
	}
	return n, nil
}

// bounce moves p through aligned buffers for O_DIRECT.
func (d *File) bounce(p []byte, off int64, write bool) (int, error) {
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	buf := *bp
	done := 0
	for done < len(p) {
		k := min(len(p)-done, len(buf))
		var err error
		if write {
			copy(buf[:k], p[done:done+k])
			_, err = d.f.WriteAt(buf[:k], off+int64(done))
		} else {
			_, err = d.f.ReadAt(buf[:k], off+int64(done))
			copy(p[done:done+k], buf[:k])
		}
		if err != nil {
			return done, fmt.Errorf("blockdev: %s at %d: %w", d.path, off+int64(done), err)
		}
		done += k
	}
	return done, nil
}

// Flush implements Device with fdatasync.
func (d *File) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	if err := datasync(d.f); err != nil {
		return fmt.Errorf("blockdev: flush %s: %w", d.path, err)
	}
	return nil
}

// Discard implements Device. Regular files get a hole punched (fallocate
// PUNCH_HOLE|KEEP_SIZE); block device nodes get fallocate on the node, which
// the kernel turns into a discard or zero-out that reads back as zeros.
// Where neither is available the range is overwritten with zeros.
func (d *File) Discard(off, n int64) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	if d.ro {
		return fmt.Errorf("%w: %s", ErrReadOnly, d.path)
	}
	if n == 0 {
		return nil
	}
	if d.punch.Load() {
		err := punchHole(d.f, off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrNotSupported) {
			return fmt.Errorf("blockdev: discard %s at %d+%d: %w", d.path, off, n, err)
		}
		d.punch.Store(false)
	}
	return d.zeroFill(off, n)
}

// WriteZeroes implements ZeroWriter.
func (d *File) WriteZeroes(off, n int64) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	if d.ro {
		return fmt.Errorf("%w: %s", ErrReadOnly, d.path)
	}
	if n == 0 {
		return nil
	}
	if err := zeroRange(d.f, off, n); err == nil {
		return nil
	}
	return d.zeroFill(off, n)
}

func (d *File) zeroFill(off, n int64) error {
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	buf := *bp
	clear(buf)
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := d.f.WriteAt(buf[:k], off); err != nil {
			return fmt.Errorf("blockdev: zero %s at %d: %w", d.path, off, err)
		}
		off += k
		n -= k
	}
	return nil
}

// MapAllocation implements AllocationMapper for regular files using
// SEEK_DATA/SEEK_HOLE where the file system supports them.
func (d *File) MapAllocation(off, n int64) (int64, Allocation, error) {
	if err := d.check(off, n); err != nil {
		return 0, Allocated, err
	}
	if n == 0 || d.isBlock {
		return n, Allocated, nil
	}
	length, hole := seekMap(d.f, off, n)
	length -= length % int64(d.bs)
	if length <= 0 {
		// A hole or data boundary that is not block aligned: report the
		// first block as data, which is always safe.
		return int64(d.bs), Allocated, nil
	}
	if hole {
		return length, Hole, nil
	}
	return length, Allocated, nil
}

// Fd returns the file descriptor, for backends (such as URing) that issue
// I/O on it directly.
func (d *File) Fd() uintptr { return d.f.Fd() }

// Direct reports whether the file was opened with O_DIRECT.
func (d *File) Direct() bool { return d.direct }

// Size implements Device.
func (d *File) Size() int64 { return d.size }

// BlockSize implements Device.
func (d *File) BlockSize() int { return d.bs }

// Close implements Device. It does not flush.
func (d *File) Close() error {
	if d.closed.Swap(true) {
		return ErrClosed
	}
	return d.f.Close()
}
