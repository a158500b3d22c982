//go:build linux

package blockdev

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
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
// Requests queued by many goroutines while one of them is inside
// io_uring_enter are submitted together by the next enter, and a single
// reaper goroutine hands each completion to the goroutine waiting for it.
// Nothing is allocated per request: request slots, their channels and the
// rings are set up by OpenURing.
//
// With FileOptions.Direct the file is opened O_DIRECT; buffers from
// AlignedBuffer go to the kernel as they are, others are copied through
// aligned bounce buffers.
//
// Close waits for requests in flight, then stops the reaper, unmaps the
// rings and closes the file. Where the kernel refuses io_uring (ENOSYS,
// EPERM from sysctl kernel.io_uring_disabled or seccomp), OpenURing returns
// an error wrapping ErrNotSupported: use File there.
type URing struct {
	f     *File // geometry, descriptor, Discard fallback, WriteZeroes, MapAllocation
	r     *ring
	sqeFd int32 // 0 (fixed file 0) or the descriptor
	sqeFl uint8 // IOSQE_FIXED_FILE or 0

	// maxLen bounds the length of one SQE; longer transfers (and short
	// transfers) are completed by further SQEs for the remainder.
	maxLen int

	// slots are the request slots; user_data of an SQE is its slot index.
	// free holds the indexes of unused slots: taking one is the right to
	// have one SQE/CQE pair in flight, so the SQ and CQ never overflow.
	slots []uringSlot
	free  chan uint32

	// sqMu protects sqTail (our copy of the SQ tail) and the SQE array
	// positions between the kernel's SQ head and sqTail. It is a leaf lock.
	sqMu   sync.Mutex
	sqTail uint32
	// submitting is set while one goroutine runs io_uring_enter to submit
	// for everyone; others leave their SQEs to it (flat combining).
	submitting atomic.Bool

	punch      atomic.Bool   // FALLOCATE punch-hole still works through the ring
	closed     atomic.Bool   // Close has begun
	closing    chan struct{} // closed by Close: wakes goroutines waiting for a slot
	reaperDone chan struct{} // closed when the reaper goroutine returns

	// broken is closed (once) when io_uring_enter fails in a way that is not
	// transient; brokenErr says why. Waiters stop waiting and return it.
	broken     chan struct{}
	brokenOnce sync.Once
	brokenErr  error
}

// uringSlot is one request slot. The reaper sends each completion's res
// (bytes done or -errno) on done; the waiter owns the other fields. (Passing
// res by channel rather than in a field matters to the race detector, which
// cannot see the ordering the kernel provides between the slot's last
// completion and its next one.)
type uringSlot struct {
	done chan int32
	// buf references the buffer the kernel may be reading or writing, so
	// that it stays alive (and is on the heap, where it cannot move) until
	// the completion arrives.
	buf []byte
}

// uringExitTag is the user_data of the NOP with which Close stops the reaper.
const uringExitTag = 1 << 63

// uringRegisterFile selects registered (fixed) files; benchmarks turn it off
// to measure what it buys.
var uringRegisterFile = true

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
	n := r.sqEntries
	u := &URing{
		f:          f,
		r:          r,
		sqeFd:      int32(f.Fd()),
		maxLen:     1 << 30,
		slots:      make([]uringSlot, n),
		free:       make(chan uint32, n),
		closing:    make(chan struct{}),
		reaperDone: make(chan struct{}),
		broken:     make(chan struct{}),
	}
	for i := range u.slots {
		u.slots[i].done = make(chan int32, 1)
		u.free <- uint32(i)
	}
	u.punch.Store(r.ops[uringOpFallocate])
	if uringRegisterFile && r.registerFile(u.sqeFd) == nil {
		u.sqeFd, u.sqeFl = 0, uringSQEFixedFile
	}
	go u.reap()
	return u, nil
}

// acquire takes a free request slot, waiting while all are in flight.
func (u *URing) acquire() (uint32, error) {
	if u.closed.Load() {
		return 0, ErrClosed
	}
	select {
	case i := <-u.free:
		return i, nil
	case <-u.closing:
		return 0, ErrClosed
	}
}

func (u *URing) release(i uint32) { u.free <- i }

// exec queues one SQE for slot i, sees that it is submitted, and waits for
// its completion. It returns the CQE's res (bytes done or -errno).
func (u *URing) exec(i uint32, op uint8, addr uint64, n uint32, off uint64, opFlags uint32) (int32, error) {
	r := u.r
	u.sqMu.Lock()
	t := u.sqTail
	// Holding a slot guarantees a free SQ position (at most one
	// unsubmitted SQE per slot); the loop only guards that invariant.
	for t-atomic.LoadUint32(r.sqHead) >= r.sqEntries {
		u.sqMu.Unlock()
		if err := u.kick(); err != nil {
			return 0, err
		}
		runtime.Gosched()
		u.sqMu.Lock()
		t = u.sqTail
	}
	r.sqes[t&r.sqMask] = uringSQE{
		opcode:   op,
		flags:    u.sqeFl,
		fd:       u.sqeFd,
		off:      off,
		addr:     addr,
		len:      n,
		opFlags:  opFlags,
		userData: uint64(i),
	}
	u.sqTail = t + 1
	atomic.StoreUint32(r.sqTail, t+1) // publishes the SQE
	u.sqMu.Unlock()

	if err := u.kick(); err != nil {
		return 0, err
	}
	s := &u.slots[i]
	select {
	case res := <-s.done:
		return res, nil
	case <-u.broken:
		return 0, u.brokenErr
	}
}

// kick submits every published SQE, unless another goroutine is already
// submitting: that one checks for more after it clears the flag, so an SQE
// published before a failed CompareAndSwap is always seen (the flag and the
// tail are both sequentially consistent atomics).
func (u *URing) kick() error {
	r := u.r
	for r.unsubmitted() != 0 && u.submitting.CompareAndSwap(false, true) {
		var err error
		for err == nil {
			k := r.unsubmitted()
			if k == 0 {
				break
			}
			_, err = r.enter(k, 0, 0)
			err = transientEnter(err)
		}
		u.submitting.Store(false)
		if err != nil {
			u.fail(fmt.Errorf("blockdev: io_uring_enter (submit): %w", err))
			return u.brokenErr
		}
	}
	return nil
}

// transientEnter returns nil for io_uring_enter errors that only mean "try
// again", after yielding for the ones that wait on other goroutines.
func transientEnter(err error) error {
	switch err {
	case nil, unix.EINTR:
		return nil
	case unix.EAGAIN, unix.EBUSY:
		runtime.Gosched()
		return nil
	}
	return err
}

// fail marks the ring unusable and wakes every waiter.
func (u *URing) fail(err error) {
	u.brokenOnce.Do(func() {
		u.brokenErr = fmt.Errorf("%w: %w", ErrIO, err)
		close(u.broken)
	})
}

// reap is the completion goroutine: it waits in io_uring_enter for CQEs and
// delivers each to the slot named by its user_data, until the exit NOP.
func (u *URing) reap() {
	defer close(u.reaperDone)
	r := u.r
	head := atomic.LoadUint32(r.cqHead)
	for {
		tail := atomic.LoadUint32(r.cqTail)
		if head == tail {
			_, err := r.enter(0, 1, uringEnterGetEvents)
			if err = transientEnter(err); err != nil {
				u.fail(fmt.Errorf("blockdev: io_uring_enter (wait): %w", err))
				return
			}
			continue
		}
		exit := false
		for ; head != tail; head++ {
			c := &r.cqes[head&r.cqMask]
			ud, res := c.userData, c.res
			if ud >= uint64(len(u.slots)) {
				exit = exit || ud == uringExitTag
				continue
			}
			u.slots[ud].done <- res
		}
		atomic.StoreUint32(r.cqHead, head) // hands the CQ entries back
		if exit {
			return
		}
	}
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

// retryable reports whether a negative CQE result means the request did
// nothing and may simply be issued again.
func retryable(res int32) bool {
	switch unix.Errno(-res) {
	case unix.EINTR, unix.EAGAIN, unix.ECANCELED:
		return true
	}
	return false
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
	// Taking every slot waits for every request in flight.
	for range len(u.slots) {
		select {
		case <-u.free:
		case <-u.broken:
			return u.closeBroken()
		}
	}
	// The NOP's completion stops the reaper; no other request is in flight.
	u.sqMu.Lock()
	t := u.sqTail
	u.r.sqes[t&u.r.sqMask] = uringSQE{opcode: uringOpNop, userData: uringExitTag}
	u.sqTail = t + 1
	atomic.StoreUint32(u.r.sqTail, t+1)
	u.sqMu.Unlock()
	if err := u.kick(); err != nil {
		return u.closeBroken()
	}
	select {
	case <-u.reaperDone:
	case <-u.broken:
		return u.closeBroken()
	}
	u.r.close()
	return u.f.Close()
}

// closeBroken closes a ring that failed. The rings are unmapped only if the
// reaper has stopped reading them; otherwise they are left mapped (and the
// descriptor open) rather than risk the reaper touching unmapped memory.
func (u *URing) closeBroken() error {
	select {
	case <-u.reaperDone:
		u.r.close()
	default:
	}
	return errors.Join(u.brokenErr, u.f.Close())
}
