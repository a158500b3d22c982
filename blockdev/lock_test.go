package blockdev_test

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func openFile(t *testing.T, path string, ro bool) *blockdev.File {
	return blockdevtest.OpenFile(t, path, ro)
}

// lockTarget makes a file to lock and returns its path.
func lockTarget(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "dev")
	blockdevtest.CreateFile(t, path, 1<<20)
	return path
}

func TestFileLockModes(t *testing.T) {
	if runtime.GOOS == "windows" || runtime.GOOS == "plan9" {
		t.Skip("no flock(2) on " + runtime.GOOS)
	}
	path := lockTarget(t)
	a, b := openFile(t, path, false), openFile(t, path, true)
	cases := []struct {
		first, second blockdev.LockMode
		ok            bool
	}{
		{blockdev.LockExclusive, blockdev.LockExclusive, false},
		{blockdev.LockExclusive, blockdev.LockShared, false},
		{blockdev.LockShared, blockdev.LockExclusive, false},
		{blockdev.LockShared, blockdev.LockShared, true},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%v-then-%v", c.first, c.second), func(t *testing.T) {
			require.NoError(t, a.Lock(c.first))
			err := b.Lock(c.second)
			if c.ok {
				require.NoError(t, err)
				require.NoError(t, b.Unlock())
			} else {
				require.ErrorIs(t, err, blockdev.ErrLocked)
				require.Contains(t, err.Error(), path)
				if runtime.GOOS == "linux" {
					require.Contains(t, err.Error(), fmt.Sprintf("pid %d (this process)", os.Getpid()))
				}
			}
			require.NoError(t, a.Unlock())
			require.NoError(t, b.Lock(c.second), "released by Unlock")
			require.NoError(t, b.Unlock())
		})
	}
}

func TestFileLockSameHandleAndClose(t *testing.T) {
	path := lockTarget(t)
	a := openFile(t, path, false)
	require.NoError(t, a.Lock(blockdev.LockShared))
	err := a.Lock(blockdev.LockShared)
	require.ErrorIs(t, err, blockdev.ErrLocked, "not reentrant")
	require.Contains(t, err.Error(), "already locked through this handle")
	require.NoError(t, a.Close())
	require.ErrorIs(t, a.Lock(blockdev.LockShared), blockdev.ErrClosed)
	require.NoError(t, a.Unlock(), "Close released it")
	b := openFile(t, path, false)
	require.NoError(t, b.Lock(blockdev.LockExclusive), "Close released it")
}

func TestLockDeviceViews(t *testing.T) {
	path := lockTarget(t)
	a, b := openFile(t, path, false), openFile(t, path, false)
	release, err := blockdev.LockDevice(blockdev.ReadOnly(a), blockdev.LockShared)
	require.NoError(t, err)
	_, err = blockdev.LockDevice(b, blockdev.LockExclusive)
	require.ErrorIs(t, err, blockdev.ErrLocked, "the view locks its parent")
	require.NoError(t, release())
	release, err = blockdev.LockDevice(b, blockdev.LockExclusive)
	require.NoError(t, err)
	require.NoError(t, release())

	sl, err := blockdev.Slice(a, 0, 4096)
	require.NoError(t, err)
	for _, d := range []blockdev.Device{sl, blockdev.ReadOnly(sl)} {
		release, err := blockdev.LockDevice(d, blockdev.LockExclusive)
		require.NoError(t, err, "a device that cannot lock is not locked")
		require.NoError(t, release())
	}
}

// A Mem's lock works within the process, as a File's does across handles.
func TestMemLock(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	release, err := blockdev.LockDevice(m, blockdev.LockShared)
	require.NoError(t, err)
	release2, err := blockdev.LockDevice(blockdev.ReadOnly(m), blockdev.LockShared)
	require.NoError(t, err, "shared locks share")
	err = m.Lock(blockdev.LockExclusive)
	require.ErrorIs(t, err, blockdev.ErrLocked)
	require.Contains(t, err.Error(), fmt.Sprintf("memory device is locked by another user (held by pid %d (this process))", os.Getpid()))
	require.NoError(t, release())
	require.ErrorIs(t, m.Lock(blockdev.LockExclusive), blockdev.ErrLocked, "one shared lock is left")
	require.NoError(t, release2())
	require.NoError(t, m.Lock(blockdev.LockExclusive))
	require.ErrorIs(t, m.Lock(blockdev.LockShared), blockdev.ErrLocked)
	require.ErrorIs(t, m.Lock(blockdev.LockExclusive), blockdev.ErrLocked)
	require.NoError(t, m.Unlock())
	require.NoError(t, m.Lock(blockdev.LockShared))
	require.NoError(t, m.Close())
	require.ErrorIs(t, m.Lock(blockdev.LockShared), blockdev.ErrClosed)
}

// TestFileLockOtherProcess holds the lock in a child process
// (TestLockHelperProcess) and sees a second opener refused with the child's
// pid, then succeed once the child has exited.
func TestFileLockOtherProcess(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the holder's pid comes from /proc/locks (Linux)")
	}
	path := lockTarget(t)
	pid, finish := blockdevtest.StartChild(t, "TestLockHelperProcess", "BLOCKSNAP_LOCK_HELPER="+path)
	f := openFile(t, path, true)
	err := f.Lock(blockdev.LockShared)
	require.ErrorIs(t, err, blockdev.ErrLocked)
	require.Contains(t, err.Error(), fmt.Sprintf("held by pid %d)", pid))
	finish() // the child exits, and its lock goes with it
	require.NoError(t, f.Lock(blockdev.LockShared))
}

// TestLockHelperProcess is the child of TestFileLockOtherProcess.
func TestLockHelperProcess(t *testing.T) {
	path := os.Getenv("BLOCKSNAP_LOCK_HELPER")
	if path == "" {
		t.Skip("run by TestFileLockOtherProcess")
	}
	f := openFile(t, path, false)
	require.NoError(t, f.Lock(blockdev.LockExclusive))
	blockdevtest.ChildReady()
}

func TestIsReadOnly(t *testing.T) {
	path := lockTarget(t)
	rw, ro := openFile(t, path, false), openFile(t, path, true)
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	sl, err := blockdev.Slice(ro, 0, 4096)
	require.NoError(t, err)
	slw, err := blockdev.Slice(rw, 0, 4096)
	require.NoError(t, err)
	for _, c := range []struct {
		d  blockdev.Device
		ro bool
	}{{rw, false}, {ro, true}, {m, false}, {blockdev.ReadOnly(m), true}, {sl, true}, {slw, false}} {
		require.Equal(t, c.ro, blockdev.IsReadOnly(c.d), "%T", c.d)
	}
}
