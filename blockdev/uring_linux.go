//go:build linux

package blockdev

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// URing is a Device over a regular file or block device node that issues
// its I/O through io_uring: reads and writes as IORING_OP_READ/WRITE (pread
// and pwrite semantics), Flush as IORING_OP_FSYNC with DATASYNC, Discard as
// IORING_OP_FALLOCATE with PUNCH_HOLE|KEEP_SIZE (falling back to File's
// Discard where the kernel or file system refuses).
//
// Queue depth comes from concurrency, as with any Device: each calling
// goroutine has one request in flight, up to URingOptions.Entries of them.
// SQEs queued by many goroutines while one of them is inside io_uring_enter
// are submitted together by one later enter, and one waiting goroutine at a
// time reaps the completion queue for all (uring_queue_linux.go). There is
// no background goroutine. Nothing is allocated per request: request slots,
// their channels and the rings are set up by OpenURing.
//
// With FileOptions.Direct the file is opened O_DIRECT; buffers from
// AlignedBuffer go to the kernel as they are, others are copied through
// aligned bounce buffers.
//
// Close waits for requests in flight, then unmaps the rings and closes the
// file. Where the kernel refuses io_uring (ENOSYS, EPERM from sysctl
// kernel.io_uring_disabled or seccomp), OpenURing returns an error wrapping
// ErrNotSupported: use File there.
type URing struct {
	f     *File // geometry, descriptor, Discard fallback, WriteZeroes, MapAllocation
	r     *ring
	sqeFd int32 // 0 (fixed file 0) or the descriptor
	sqeFl uint8 // IOSQE_FIXED_FILE or 0

	// maxLen bounds the length of one SQE; longer transfers (and short
	// transfers) are completed by further SQEs for the remainder.
	maxLen int

	punch   atomic.Bool   // FALLOCATE punch-hole still works through the ring
	closed  atomic.Bool   // Close has begun
	closing chan struct{} // closed by Close: wakes goroutines waiting for a slot

	uringQueue
}

// uringRegisterFile selects registered (fixed) files (IORING_REGISTER_FILES,
// IOSQE_FIXED_FILE). Off: with one file per ring they gave no measurable
// gain in 4 KiB O_DIRECT random writes (A/B runs within noise of each
// other); tests cover both paths.
var uringRegisterFile = false

// OpenURing opens an existing regular file or block device node, as Open
// does, and sets up an io_uring for its I/O.
func OpenURing(path string, opts URingOptions) (*URing, error) {
	f, err := Open(path, opts.FileOptions)
	if err != nil {
		return nil, err
	}
	return newURing(f, opts)
}

// CreateURing makes (or truncates) the regular file at path with the given
// size, sparse, as Create does, and opens it with io_uring.
func CreateURing(path string, size int64, opts URingOptions) (*URing, error) {
	f, err := Create(path, size, opts.FileOptions)
	if err != nil {
		return nil, err
	}
	return newURing(f, opts)
}

func newURing(f *File, opts URingOptions) (*URing, error) {
	r, err := newRing(opts.entries())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdev: open %s: %w", f.path, err)
	}
	u := &URing{
		f:       f,
		r:       r,
		sqeFd:   int32(f.Fd()),
		maxLen:  1 << 30,
		closing: make(chan struct{}),
	}
	u.initQueue(r.sqEntries)
	u.punch.Store(r.ops[uringOpFallocate])
	if uringRegisterFile && r.registerFile(u.sqeFd) == nil {
		u.sqeFd, u.sqeFl = 0, uringSQEFixedFile
	}
	return u, nil
}

// uringDefaultEntries and uringMaxEntries bound URingOptions.Entries.
const (
	uringDefaultEntries = 128
	uringMaxEntries     = 4096
)

func (o URingOptions) entries() uint32 {
	switch {
	case o.Entries <= 0:
		return uringDefaultEntries
	case o.Entries > uringMaxEntries:
		return uringMaxEntries
	}
	return uint32(o.Entries)
}

// transfer moves all of p to or from off through slot i, resubmitting the
// remainder after a short transfer.
func (u *URing) transfer(i uint32, p []byte, off int64, write bool) (int, error) {
	op, what := uint8(uringOpRead), "read"
	if write {
		op, what = uringOpWrite, "write"
	}
	s := &u.slots[i]
	s.buf = p
	defer func() { s.buf = nil }()
	done, retries := 0, 0
	for done < len(p) {
		q := p[done:]
		k := min(len(q), u.maxLen)
		res, err := u.exec(i, op, uint64(uintptr(unsafe.Pointer(unsafe.SliceData(q)))), uint32(k), uint64(off)+uint64(done), 0)
		switch {
		case err != nil:
			return done, err
		case res > 0:
			done += int(res)
			retries = 0
		case res == 0 && write:
			return done, fmt.Errorf("blockdev: %s %s at %d: %w", what, u.f.path, off+int64(done), io.ErrShortWrite)
		case res == 0:
			return done, fmt.Errorf("blockdev: %s %s at %d: %w", what, u.f.path, off+int64(done), io.ErrUnexpectedEOF)
		case retryable(res) && retries < 16:
			retries++
		default:
			return done, fmt.Errorf("blockdev: %s %s at %d: %w", what, u.f.path, off+int64(done), unix.Errno(-res))
		}
	}
	return done, nil
}

// bounce moves p through aligned buffers, for O_DIRECT with a caller buffer
// that is not 4096-aligned in memory.
func (u *URing) bounce(i uint32, p []byte, off int64, write bool) (int, error) {
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	buf := *bp
	done := 0
	for done < len(p) {
		k := min(len(p)-done, len(buf))
		if write {
			copy(buf[:k], p[done:done+k])
		}
		if _, err := u.transfer(i, buf[:k], off+int64(done), write); err != nil {
			return done, err
		}
		if !write {
			copy(p[done:done+k], buf[:k])
		}
		done += k
	}
	return done, nil
}

func (u *URing) rw(p []byte, off int64, write bool) (int, error) {
	if u.closed.Load() {
		return 0, ErrClosed
	}
	if err := CheckRange(off, int64(len(p)), u.f.size, u.f.bs); err != nil {
		return 0, err
	}
	if write && u.f.ro {
		return 0, fmt.Errorf("%w: %s", ErrReadOnly, u.f.path)
	}
	if len(p) == 0 {
		return 0, nil
	}
	i, err := u.acquire()
	if err != nil {
		return 0, err
	}
	defer u.release(i)
	if u.f.direct && !aligned(p) {
		return u.bounce(i, p, off, write)
	}
	return u.transfer(i, p, off, write)
}

// ReadAt implements Device.
func (u *URing) ReadAt(p []byte, off int64) (int, error) { return u.rw(p, off, false) }

// WriteAt implements Device.
func (u *URing) WriteAt(p []byte, off int64) (int, error) { return u.rw(p, off, true) }

// simple runs one request that transfers no data (FSYNC, FALLOCATE),
// reissuing it when the kernel says it did nothing.
func (u *URing) simple(i uint32, op uint8, addr uint64, n uint32, off uint64, opFlags uint32) error {
	for retries := 0; ; retries++ {
		res, err := u.exec(i, op, addr, n, off, opFlags)
		switch {
		case err != nil:
			return err
		case res >= 0:
			return nil
		case !retryable(res) || retries >= 16:
			return unix.Errno(-res)
		}
	}
}

// Flush implements Device with IORING_OP_FSYNC and IORING_FSYNC_DATASYNC
// (fdatasync): writes that completed before the call are durable after it.
func (u *URing) Flush() error {
	i, err := u.acquire()
	if err != nil {
		return err
	}
	defer u.release(i)
	if err := u.simple(i, uringOpFsync, 0, 0, 0, uringFsyncDatasync); err != nil {
		return fmt.Errorf("blockdev: flush %s: %w", u.f.path, err)
	}
	return nil
}

// Discard implements Device with IORING_OP_FALLOCATE PUNCH_HOLE|KEEP_SIZE.
// Where the kernel lacks the opcode or the file system refuses to punch
// holes, it falls back to File's Discard (zeros written where nothing else
// works); the range reads as zeros afterwards either way.
func (u *URing) Discard(off, n int64) error {
	if u.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(off, n, u.f.size, u.f.bs); err != nil {
		return err
	}
	if u.f.ro {
		return fmt.Errorf("%w: %s", ErrReadOnly, u.f.path)
	}
	if n == 0 {
		return nil
	}
	i, err := u.acquire()
	if err != nil {
		return err
	}
	defer u.release(i)
	if u.punch.Load() {
		const mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
		err := u.simple(i, uringOpFallocate, uint64(n), mode, uint64(off), 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("blockdev: discard %s at %d+%d: %w", u.f.path, off, n, err)
		}
		u.punch.Store(false)
	}
	return u.f.Discard(off, n)
}

// WriteZeroes implements ZeroWriter through the File (fallocate ZERO_RANGE,
// or zeros written), holding a request slot so that Close waits for it.
func (u *URing) WriteZeroes(off, n int64) error {
	i, err := u.acquire()
	if err != nil {
		return err
	}
	defer u.release(i)
	return u.f.WriteZeroes(off, n)
}

// MapAllocation implements AllocationMapper through the File.
func (u *URing) MapAllocation(off, n int64) (int64, Allocation, error) {
	i, err := u.acquire()
	if err != nil {
		return 0, Allocated, err
	}
	defer u.release(i)
	return u.f.MapAllocation(off, n)
}

// Size implements Device.
func (u *URing) Size() int64 { return u.f.size }

// BlockSize implements Device.
func (u *URing) BlockSize() int { return u.f.bs }

// Close implements Device. Requests in flight complete first; callers that
// were waiting for a request slot get ErrClosed. It does not flush.
func (u *URing) Close() error {
	if u.closed.Swap(true) {
		return ErrClosed
	}
	close(u.closing)
	// Taking every slot waits for every request in flight, and for every
	// goroutine that was reaping: each holds its slot until it is done.
	for range len(u.slots) {
		<-u.free
	}
	u.r.close()
	err := u.f.Close()
	select {
	case <-u.broken:
		return errors.Join(u.brokenErr, err)
	default:
		return err
	}
}

// Lock implements Locker through the file.
func (u *URing) Lock(mode LockMode) error { return u.f.Lock(mode) }

// Unlock implements Locker through the file.
func (u *URing) Unlock() error { return u.f.Unlock() }

// ReadOnly implements ReadOnlyReporter.
func (u *URing) ReadOnly() bool { return u.f.ro }
