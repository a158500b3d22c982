//go:build linux

package blockdev

// The io_uring ABI (include/uapi/linux/io_uring.h) and the ring itself: setup,
// the three mmaps, submission-queue and completion-queue index handling.
//
// Shared-memory layout, as the kernel reports it in io_uring_params:
//
//	struct io_uring_params (120 bytes, passed to io_uring_setup)
//	  0  u32 sq_entries      8  u32 flags          16 u32 sq_thread_idle
//	  4  u32 cq_entries     12  u32 sq_thread_cpu  20 u32 features
//	 24  u32 wq_fd          28  u32 resv[3]
//	 40  io_sqring_offsets (40 bytes): head tail ring_mask ring_entries flags
//	     dropped array resv1 (u32 each), user_addr (u64)
//	 80  io_cqring_offsets (40 bytes): head tail ring_mask ring_entries
//	     overflow cqes flags resv1 (u32 each), user_addr (u64)
//
//	struct io_uring_sqe (64 bytes, array mmapped at IORING_OFF_SQES)
//	  0 u8 opcode   1 u8 flags   2 u16 ioprio   4 s32 fd
//	  8 u64 off (for FALLOCATE: the offset)
//	 16 u64 addr (buffer; for FALLOCATE: the length)
//	 24 u32 len (bytes; for FALLOCATE: the mode)
//	 28 u32 rw_flags / fsync_flags
//	 32 u64 user_data   40 u16 buf_index   42 u16 personality
//	 44 s32 splice_fd_in   48 u64 pad[2]
//
//	struct io_uring_cqe (16 bytes, array at cq_off.cqes in the CQ ring)
//	  0 u64 user_data   8 s32 res (bytes or -errno)   12 u32 flags
//
// Memory ordering: userspace owns the SQ tail and the CQ head, the kernel the
// SQ head and the CQ tail. Every shared index is read and written with
// sync/atomic (sequentially consistent, so at least acquire/release): an SQE
// is fully written before the SQ tail store that publishes it, and a CQE is
// read after the CQ tail load that reveals it and before the CQ head store
// that hands its slot back.

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Opcodes, flags and mmap offsets from include/uapi/linux/io_uring.h.
const (
	uringOpNop       = 0
	uringOpFsync     = 3
	uringOpFallocate = 17
	uringOpRead      = 22
	uringOpWrite     = 23

	uringFsyncDatasync  = 1 << 0
	uringEnterGetEvents = 1 << 0
	uringSQEFixedFile   = 1 << 0
	uringFeatSingleMmap = 1 << 0

	uringOffSQRing = 0
	uringOffCQRing = 0x8000000
	uringOffSQEs   = 0x10000000

	uringRegisterFiles   = 2
	uringUnregisterFiles = 3
	uringRegisterProbe   = 8
	uringOpSupported     = 1 << 0
)

type uringSQE struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	opFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFdIn  int32
	_           [2]uint64
}

type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

type uringSQOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type uringCQOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  uringSQOffsets
	cqOff                                                                  uringCQOffsets
}

type uringProbeOp struct {
	op    uint8
	resv  uint8
	flags uint16
	resv2 uint32
}

type uringProbe struct {
	lastOp uint8
	opsLen uint8
	resv   uint16
	resv2  [3]uint32
	ops    [256]uringProbeOp
}

// Compile-time checks of the ABI sizes: a wrong size is an out-of-range
// constant index.
var (
	_ = [1]int{}[unsafe.Sizeof(uringSQE{})-64]
	_ = [1]int{}[unsafe.Sizeof(uringCQE{})-16]
	_ = [1]int{}[unsafe.Sizeof(uringParams{})-120]
	_ = [1]int{}[unsafe.Sizeof(uringProbe{})-16-256*8]
)

// uringSetupHook, when set (by tests), replaces the io_uring_setup system
// call, so that the path taken when the kernel refuses io_uring is testable.
var uringSetupHook func(entries uint32, p *uringParams) (int, error)

func uringSetup(entries uint32, p *uringParams) (int, error) {
	if uringSetupHook != nil {
		return uringSetupHook(entries, p)
	}
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// ring is one io_uring instance. Its methods do no locking: URing serializes
// SQ writers with sqMu, io_uring_enter submitters with its submitting flag,
// and lets only the goroutine holding the reaper's baton consume CQEs.
type ring struct {
	fd       int
	features uint32
	ops      [256]bool // opcodes the kernel supports (IORING_REGISTER_PROBE)

	sqMem, cqMem, sqeMem []byte // the mmaps; cqMem is nil with IORING_FEAT_SINGLE_MMAP

	sqHead, sqTail *uint32 // sqHead is the kernel's, sqTail ours
	sqMask         uint32
	sqEntries      uint32
	sqes           []uringSQE

	cqHead, cqTail *uint32 // cqTail is the kernel's, cqHead ours
	cqMask         uint32
	cqes           []uringCQE
}

// newRing sets up a ring with at least entries SQ entries (a power of two).
// When the kernel refuses io_uring outright (not built in, disabled by
// sysctl kernel.io_uring_disabled, blocked by seccomp), the error wraps
// ErrNotSupported.
func newRing(entries uint32) (*ring, error) {
	var p uringParams
	fd, err := uringSetup(entries, &p)
	if err != nil {
		switch err {
		case unix.ENOSYS, unix.EPERM, unix.EACCES:
			return nil, fmt.Errorf("blockdev: io_uring refused by the kernel (%w; not built in, sysctl kernel.io_uring_disabled, or seccomp): use blockdev.File instead: %w", err, ErrNotSupported)
		}
		return nil, fmt.Errorf("blockdev: io_uring_setup(%d): %w", entries, err)
	}
	r := &ring{fd: fd, features: p.features}
	if err := r.mmap(&p); err != nil {
		r.close()
		return nil, fmt.Errorf("blockdev: io_uring mmap: %w", err)
	}
	if err := r.probe(); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *ring) mmap(p *uringParams) error {
	const prot = unix.PROT_READ | unix.PROT_WRITE
	const flags = unix.MAP_SHARED | unix.MAP_POPULATE
	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*int(unsafe.Sizeof(uringCQE{}))
	single := p.features&uringFeatSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	if r.sqMem, err = unix.Mmap(r.fd, uringOffSQRing, sqSize, prot, flags); err != nil {
		return err
	}
	cq := r.sqMem
	if !single {
		if r.cqMem, err = unix.Mmap(r.fd, uringOffCQRing, cqSize, prot, flags); err != nil {
			return err
		}
		cq = r.cqMem
	}
	sqeSize := int(p.sqEntries) * int(unsafe.Sizeof(uringSQE{}))
	if r.sqeMem, err = unix.Mmap(r.fd, uringOffSQEs, sqeSize, prot, flags); err != nil {
		return err
	}

	sq := r.sqMem
	r.sqHead = (*uint32)(unsafe.Pointer(&sq[p.sqOff.head]))
	r.sqTail = (*uint32)(unsafe.Pointer(&sq[p.sqOff.tail]))
	r.sqMask = *(*uint32)(unsafe.Pointer(&sq[p.sqOff.ringMask]))
	r.sqEntries = *(*uint32)(unsafe.Pointer(&sq[p.sqOff.ringEntries]))
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqeMem[0])), r.sqEntries)
	// The SQ array maps ring positions to SQE indexes; we always use SQE
	// i for position i (mod entries), so it is the identity, set once.
	array := unsafe.Slice((*uint32)(unsafe.Pointer(&sq[p.sqOff.array])), r.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}

	r.cqHead = (*uint32)(unsafe.Pointer(&cq[p.cqOff.head]))
	r.cqTail = (*uint32)(unsafe.Pointer(&cq[p.cqOff.tail]))
	r.cqMask = *(*uint32)(unsafe.Pointer(&cq[p.cqOff.ringMask]))
	cqEntries := *(*uint32)(unsafe.Pointer(&cq[p.cqOff.ringEntries]))
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Pointer(&cq[p.cqOff.cqes])), cqEntries)
	return nil
}

// probe records which opcodes the kernel supports and insists on the ones
// the Device needs (Linux 5.6 and later have them all).
func (r *ring) probe() error {
	pr := new(uringProbe)
	if err := r.register(uringRegisterProbe, unsafe.Pointer(pr), uint32(len(pr.ops))); err != nil {
		return fmt.Errorf("blockdev: io_uring too old (no IORING_REGISTER_PROBE, %w; needs Linux 5.6): use blockdev.File instead: %w", err, ErrNotSupported)
	}
	for _, op := range pr.ops[:min(int(pr.opsLen), len(pr.ops))] {
		r.ops[op.op] = op.flags&uringOpSupported != 0
	}
	for _, op := range []struct {
		code uint8
		name string
	}{{uringOpNop, "NOP"}, {uringOpRead, "READ"}, {uringOpWrite, "WRITE"}, {uringOpFsync, "FSYNC"}} {
		if !r.ops[op.code] {
			return fmt.Errorf("blockdev: io_uring lacks IORING_OP_%s: use blockdev.File instead: %w", op.name, ErrNotSupported)
		}
	}
	return nil
}

func (r *ring) register(op uint32, arg unsafe.Pointer, n uint32) error {
	for {
		_, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), uintptr(op), uintptr(arg), uintptr(n), 0, 0)
		runtime.KeepAlive(arg)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}

// registerFile makes fd the ring's fixed file 0.
func (r *ring) registerFile(fd int32) error {
	fds := []int32{fd}
	return r.register(uringRegisterFiles, unsafe.Pointer(&fds[0]), 1)
}

// enter is io_uring_enter: submit toSubmit SQEs and, with GETEVENTS, wait
// for minComplete completions. It may block, so it is a normal (not raw)
// system call and the Go scheduler runs other goroutines meanwhile.
func (r *ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	n, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// unsubmitted is how many published SQEs the kernel has not consumed.
func (r *ring) unsubmitted() uint32 {
	return atomic.LoadUint32(r.sqTail) - atomic.LoadUint32(r.sqHead)
}

// close unmaps the rings and closes the ring's descriptor. The kernel drops
// the registered file with the ring.
func (r *ring) close() {
	for _, m := range [][]byte{r.sqeMem, r.cqMem, r.sqMem} {
		if m != nil {
			_ = unix.Munmap(m)
		}
	}
	r.sqeMem, r.cqMem, r.sqMem = nil, nil, nil
	_ = unix.Close(r.fd)
}
