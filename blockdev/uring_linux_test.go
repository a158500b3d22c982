//go:build linux

package blockdev

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func newTestURing(t *testing.T, size int64, opts URingOptions) (*URing, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	u, err := CreateURing(path, size, opts)
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("io_uring not usable here: %v", err)
	}
	require.NoError(t, err)
	return u, path
}

// TestURingABI checks the struct layouts against include/uapi/linux/io_uring.h.
func TestURingABI(t *testing.T) {
	var sqe uringSQE
	require.EqualValues(t, 4, unsafe.Offsetof(sqe.fd))
	require.EqualValues(t, 8, unsafe.Offsetof(sqe.off))
	require.EqualValues(t, 16, unsafe.Offsetof(sqe.addr))
	require.EqualValues(t, 24, unsafe.Offsetof(sqe.len))
	require.EqualValues(t, 28, unsafe.Offsetof(sqe.opFlags))
	require.EqualValues(t, 32, unsafe.Offsetof(sqe.userData))
	require.EqualValues(t, 40, unsafe.Offsetof(sqe.bufIndex))
	require.EqualValues(t, 44, unsafe.Offsetof(sqe.spliceFdIn))
	var cqe uringCQE
	require.EqualValues(t, 8, unsafe.Offsetof(cqe.res))
	var p uringParams
	require.EqualValues(t, 20, unsafe.Offsetof(p.features))
	require.EqualValues(t, 40, unsafe.Offsetof(p.sqOff))
	require.EqualValues(t, 80, unsafe.Offsetof(p.cqOff))
	require.EqualValues(t, 24, unsafe.Offsetof(p.sqOff.array))
	require.EqualValues(t, 20, unsafe.Offsetof(p.cqOff.cqes))
}

// TestURingRefused forces io_uring_setup to fail as a kernel that refuses
// io_uring does, and checks the error and that nothing is left open.
func TestURingRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	f, err := Create(path, 1<<20, FileOptions{})
	require.NoError(t, err)
	require.NoError(t, f.Close())
	defer func() { uringSetupHook = nil }()
	for _, errno := range []unix.Errno{unix.ENOSYS, unix.EPERM, unix.EACCES} {
		uringSetupHook = func(uint32, *uringParams) (int, error) { return -1, errno }
		fdsBefore := openFDs(t)
		u, err := OpenURing(path, URingOptions{})
		require.Nil(t, u)
		require.ErrorIs(t, err, ErrNotSupported, "errno %v", errno)
		require.ErrorIs(t, err, errno)
		require.Contains(t, err.Error(), "use blockdev.File")
		require.Equal(t, fdsBefore, openFDs(t), "descriptors leaked")
		_, err = CreateURing(filepath.Join(t.TempDir(), "new"), 1<<20, URingOptions{})
		require.ErrorIs(t, err, ErrNotSupported)
	}
	// Other failures are reported as what they are.
	uringSetupHook = func(uint32, *uringParams) (int, error) { return -1, unix.EINVAL }
	_, err = OpenURing(path, URingOptions{})
	require.ErrorIs(t, err, unix.EINVAL)
	require.NotErrorIs(t, err, ErrNotSupported)
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(ents)
}

// TestURingShortTransfers caps each SQE at one block, so every transfer
// completes through the resubmit-the-remainder path.
func TestURingShortTransfers(t *testing.T) {
	for _, direct := range []bool{false, true} {
		u, _ := newTestURing(t, 4<<20, URingOptions{FileOptions: FileOptions{Direct: direct}})
		u.maxLen = u.BlockSize()
		want := make([]byte, 1<<20+1)[1:] // unaligned: bounced under O_DIRECT
		for i := range want {
			want[i] = byte(i*31 + i>>12)
		}
		_, err := u.WriteAt(want, 64<<10)
		require.NoError(t, err)
		got := AlignedBuffer(len(want))
		_, err = u.ReadAt(got, 64<<10)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got), "direct=%v", direct)
		require.NoError(t, u.Close())
	}
}

// TestURingReadPastEOF: the file shrinks under the device; a read across
// the new end gets a short transfer, then end of file.
func TestURingReadPastEOF(t *testing.T) {
	u, path := newTestURing(t, 1<<20, URingOptions{})
	defer u.Close()
	require.NoError(t, os.Truncate(path, 512<<10))
	n, err := u.ReadAt(make([]byte, 64<<10), 512<<10-16<<10)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Equal(t, 16<<10, n)
	_, err = u.ReadAt(make([]byte, 4096), 0)
	require.NoError(t, err)
}

// TestURingDiscardPunches checks that Discard through the ring punches a
// hole (the file's blocks are freed) and that the File fallback also
// leaves zeros.
func TestURingDiscardPunches(t *testing.T) {
	u, path := newTestURing(t, 4<<20, URingOptions{})
	defer u.Close()
	if !u.punch.Load() {
		t.Skip("kernel lacks IORING_OP_FALLOCATE; the fallback is tested below")
	}
	data := bytes.Repeat([]byte{0xa5}, 4<<20)
	_, err := u.WriteAt(data, 0)
	require.NoError(t, err)
	require.NoError(t, u.Flush())
	before := allocatedBytes(t, path)

	require.NoError(t, u.Discard(1<<20, 2<<20))
	require.True(t, u.punch.Load(), "the file system refused PUNCH_HOLE")
	require.LessOrEqual(t, allocatedBytes(t, path), before-2<<20, "no hole was punched")
	got := make([]byte, 4<<20)
	_, err = u.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, IsZero(got[1<<20:3<<20]))
	require.Equal(t, data[:1<<20], got[:1<<20])
	require.Equal(t, data[3<<20:], got[3<<20:])

	u.punch.Store(false) // as after the kernel refused the opcode
	require.NoError(t, u.Discard(0, 4096))
	_, err = u.ReadAt(got[:8192], 0)
	require.NoError(t, err)
	require.True(t, IsZero(got[:4096]))
	require.Equal(t, data[:4096], got[4096:8192])
}

func allocatedBytes(t *testing.T, path string) int64 {
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	return st.Blocks * 512
}

// TestURingClose: Close unmaps the rings and closes both descriptors, with
// and without a registered file, and everything after it says ErrClosed.
func TestURingClose(t *testing.T) {
	for _, fixed := range []bool{true, false} {
		fdsBefore := openFDs(t)
		uringRegisterFile = fixed
		u, _ := newTestURing(t, 1<<20, URingOptions{Entries: 2})
		uringRegisterFile = false
		require.Equal(t, fixed, u.sqeFl == uringSQEFixedFile)
		require.Equal(t, fdsBefore+2, openFDs(t)) // the file and the ring
		buf := AlignedBuffer(4096)
		buf[0] = 7
		_, err := u.WriteAt(buf, 4096)
		require.NoError(t, err)
		clear(buf)
		_, err = u.ReadAt(buf, 4096)
		require.NoError(t, err)
		require.EqualValues(t, 7, buf[0])
		require.NoError(t, u.Close())
		require.Nil(t, u.r.sqMem)
		require.Equal(t, fdsBefore, openFDs(t))
		require.ErrorIs(t, u.Close(), ErrClosed)
		require.ErrorIs(t, u.Discard(0, 4096), ErrClosed)
		require.ErrorIs(t, u.WriteZeroes(0, 4096), ErrClosed)
		_, _, err = u.MapAllocation(0, 4096)
		require.ErrorIs(t, err, ErrClosed)
	}
}

// TestURingNoAllocs: the hot paths allocate nothing per request.
func TestURingNoAllocs(t *testing.T) {
	for _, direct := range []bool{false, true} {
		u, _ := newTestURing(t, 1<<20, URingOptions{FileOptions: FileOptions{Direct: direct}})
		buf := AlignedBuffer(4096)
		allocs := testing.AllocsPerRun(100, func() {
			if _, err := u.WriteAt(buf, 8192); err != nil {
				t.Fatal(err)
			}
			if _, err := u.ReadAt(buf, 8192); err != nil {
				t.Fatal(err)
			}
		})
		require.Zero(t, allocs, "direct=%v", direct)
		require.NoError(t, u.Close())
	}
}

// TestURingBroken makes io_uring_enter fail for good (the ring descriptor
// is replaced by /dev/null): the call that meets it, later calls and Close
// all return ErrIO, none hangs, and nothing stays open.
func TestURingBroken(t *testing.T) {
	fdsBefore := openFDs(t)
	u, _ := newTestURing(t, 1<<20, URingOptions{})
	buf := AlignedBuffer(4096)
	_, err := u.WriteAt(buf, 0)
	require.NoError(t, err)

	null, err := os.Open(os.DevNull)
	require.NoError(t, err)
	require.NoError(t, unix.Dup2(int(null.Fd()), u.r.fd))
	require.NoError(t, null.Close())

	_, err = u.WriteAt(buf, 0)
	require.ErrorIs(t, err, ErrIO)
	_, err = u.ReadAt(buf, 0)
	require.ErrorIs(t, err, ErrIO)
	require.ErrorIs(t, u.Flush(), ErrIO)
	require.ErrorIs(t, u.Close(), ErrIO)
	require.Equal(t, fdsBefore, openFDs(t))
}
