package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// fileStore formats a store on two files in a fresh directory, closes it,
// and returns their paths.
func fileStore(t *testing.T) (origin, store string) {
	t.Helper()
	dir := t.TempDir()
	origin, store = filepath.Join(dir, "origin"), filepath.Join(dir, "store")
	o, s := createFile(t, origin, 1<<20), createFile(t, store, 4<<20)
	st, err := Format(o, s, Options{ChunkSize: 16 << 10})
	require.NoError(t, err)
	require.NoError(t, st.Close())
	return origin, store
}

func createFile(t *testing.T, path string, size int64) *blockdev.File {
	return blockdevtest.CreateFile(t, path, size)
}

func openFile(t *testing.T, path string, ro bool) *blockdev.File {
	return blockdevtest.OpenFile(t, path, ro)
}

// openFiles opens the store on fresh handles of its two files.
func openFiles(t *testing.T, origin, store string, opts Options) (*Store, error) {
	t.Helper()
	return Open(openFile(t, origin, opts.ReadOnly), openFile(t, store, opts.ReadOnly), opts)
}

// A second Open of an open store, through other handles on its files or
// the same ones, is refused with ErrLocked naming the device and this
// process; a snapshot made through the first handle survives; Close
// releases the lock.
func TestSecondOpenRefused(t *testing.T) {
	originPath, storePath := fileStore(t)
	o, s := openFile(t, originPath, false), openFile(t, storePath, false)
	st, err := Open(o, s, Options{})
	require.NoError(t, err)
	_, err = st.CreateSnapshot("kept", st.Origin())
	require.NoError(t, err)

	_, err = openFiles(t, originPath, storePath, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.Contains(t, err.Error(), "store device: blockdev: "+storePath+" is locked by another user")
	if runtime.GOOS == "linux" {
		require.Contains(t, err.Error(), fmt.Sprintf("(held by pid %d (this process))", os.Getpid()))
	}
	_, err = Open(o, s, Options{})
	require.ErrorIs(t, err, ErrLocked, "the same handles")
	_, err = openFiles(t, originPath, storePath, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrLocked, "an inspection beside a writer")
	_, err = Format(openFile(t, originPath, false), openFile(t, storePath, false), Options{})
	require.ErrorIs(t, err, ErrLocked, "a Format over an open store")

	// The origin is locked too: a second store over it is refused.
	other := createFile(t, filepath.Join(t.TempDir(), "other"), 4<<20)
	_, err = Format(openFile(t, originPath, false), other, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.Contains(t, err.Error(), "origin device: blockdev: "+originPath)

	require.NoError(t, st.Close())
	st2, err := openFiles(t, originPath, storePath, Options{})
	require.NoError(t, err, "Close released the locks")
	_, err = st2.OpenVolume("kept")
	require.NoError(t, err)
	require.NoError(t, st2.Close())
	// The failed Format above released the other store's lock as it failed.
	release, err := blockdev.LockDevice(other, blockdev.LockExclusive)
	require.NoError(t, err)
	require.NoError(t, release())
}

// Two stores on one Mem in one process are refused the same way: the
// second Open fails, and a snapshot made through the first is kept.
func TestSecondOpenOfMemRefused(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	_, err := Open(origin, store, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.Contains(t, err.Error(), "store device: blockdev: memory device is locked by another user")
	_, err = Open(origin, store, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrLocked)
	_, err = s.CreateSnapshot("kept", s.Origin())
	require.NoError(t, err)
	require.NoError(t, s.Close())
	reopenKept(t, origin, store)
}

// Read-only opens share the lock with each other, and keep a writer out.
func TestReadOnlyOpensShare(t *testing.T) {
	originPath, storePath := fileStore(t)
	a, err := openFiles(t, originPath, storePath, Options{ReadOnly: true})
	require.NoError(t, err)
	b, err := openFiles(t, originPath, storePath, Options{ReadOnly: true})
	require.NoError(t, err)
	_, err = openFiles(t, originPath, storePath, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.NoError(t, a.Close())
	require.NoError(t, b.Close())
	c, err := openFiles(t, originPath, storePath, Options{})
	require.NoError(t, err)
	require.NoError(t, c.Close())
}

// An Open that fails (here: not a store) releases what it locked.
func TestFailedOpenReleasesLocks(t *testing.T) {
	dir := t.TempDir()
	o, s := createFile(t, filepath.Join(dir, "o"), 1<<20), createFile(t, filepath.Join(dir, "s"), 4<<20)
	_, err := Open(o, s, Options{})
	require.ErrorIs(t, err, ErrCorrupt)
	st, err := Format(o, s, Options{})
	require.NoError(t, err, "the failed Open left nothing locked")
	require.NoError(t, st.Close())
}

// TestOpenRefusedAcrossProcesses holds the store open in a child process
// (TestStoreHolderProcess) and sees Open refused with the child's pid, then
// succeed once the child has exited.
func TestOpenRefusedAcrossProcesses(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the holder's pid comes from /proc/locks (Linux)")
	}
	originPath, storePath := fileStore(t)
	pid, finish := blockdevtest.StartChild(t, "TestStoreHolderProcess",
		"BLOCKSNAP_HOLDER_ORIGIN="+originPath, "BLOCKSNAP_HOLDER_STORE="+storePath)
	_, err := openFiles(t, originPath, storePath, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrLocked)
	require.Contains(t, err.Error(), fmt.Sprintf("%s is locked by another user (held by pid %d)", storePath, pid))
	finish()
	st, err := openFiles(t, originPath, storePath, Options{})
	require.NoError(t, err)
	_, err = st.OpenVolume("child")
	require.NoError(t, err, "the child's snapshot is there")
	require.NoError(t, st.Close())
}

// TestStoreHolderProcess is the child of TestOpenRefusedAcrossProcesses
// and (opening views without flock, BLOCKSNAP_HOLDER_SLICES set) of
// TestOwnerRefusedAcrossProcesses.
func TestStoreHolderProcess(t *testing.T) {
	originPath, storePath := os.Getenv("BLOCKSNAP_HOLDER_ORIGIN"), os.Getenv("BLOCKSNAP_HOLDER_STORE")
	if storePath == "" {
		t.Skip("run by TestOpenRefusedAcrossProcesses")
	}
	var o, s blockdev.Device = openFile(t, originPath, false), openFile(t, storePath, false)
	if os.Getenv("BLOCKSNAP_HOLDER_SLICES") != "" {
		o, s = sliceViews(t, o, s)
	}
	st, err := Open(o, s, Options{})
	require.NoError(t, err)
	_, err = st.CreateSnapshot("child", st.Origin())
	require.NoError(t, err)
	blockdevtest.ChildReady()
	require.NoError(t, st.Close())
}

// A read-only origin is a golden image: its volume refuses writes,
// discards and rollbacks with ErrReadOnly (and says it is read-only),
// while snapshots and clones of it work; stores on two store devices may
// share it, but a store that writes it may not open beside them.
func TestReadOnlyOrigin(t *testing.T) {
	dir := t.TempDir()
	originPath := filepath.Join(dir, "golden")
	golden := createFile(t, originPath, 1<<20)
	fillPattern(t, golden, 7)
	want := make([]byte, 1<<20)
	_, err := golden.ReadAt(want, 0)
	require.NoError(t, err)

	stores := make([]*Store, 2)
	for i := range stores {
		s := createFile(t, filepath.Join(dir, fmt.Sprint("store", i)), 4<<20)
		stores[i], err = Format(openFile(t, originPath, true), s, Options{ChunkSize: 16 << 10})
		require.NoError(t, err)
	}
	_, err = Format(openFile(t, originPath, false), createFile(t, filepath.Join(dir, "rw"), 4<<20), Options{})
	require.ErrorIs(t, err, ErrLocked, "a store that would write the golden image")

	st := stores[0]
	o := st.Origin()
	require.True(t, o.ReadOnly())
	_, err = o.WriteAt(make([]byte, 4096), 0)
	require.ErrorIs(t, err, ErrReadOnly)
	require.ErrorIs(t, o.Discard(0, 4096), ErrReadOnly)
	require.ErrorIs(t, blockdev.WriteZeroes(o, 0, 4096), ErrReadOnly)
	require.NoError(t, o.Flush())

	snap, err := st.CreateSnapshot("v1", o)
	require.NoError(t, err)
	c, err := st.CreateClone("vm1", snap)
	require.NoError(t, err)
	require.False(t, c.ReadOnly())
	fillAt(t, c, 9, 0, 64<<10)
	require.NoError(t, c.Flush())
	live, err := st.CreateClone("vm2", o)
	require.NoError(t, err, "a clone of the live golden image")
	require.NoError(t, st.Rollback(context.Background(), o, snap), "nothing to roll back: the origin never changed")

	for _, v := range []*Volume{o, snap, live} {
		got := make([]byte, 1<<20)
		_, err := v.ReadAt(got, 0)
		require.NoError(t, err)
		require.Equal(t, want, got, "volume %d", v.ID())
	}
	for _, s := range stores {
		mustCheck(t, s)
		require.NoError(t, s.Close())
	}
	got := make([]byte, 1<<20)
	_, err = golden.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, want, got, "the golden image is unchanged")
}

// Rolling back a read-only origin that did change (it was writable when
// snapshotted) is refused: it would have to write it.
func TestReadOnlyOriginRollback(t *testing.T) {
	st, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	_, err := st.CreateSnapshot("before", st.Origin())
	require.NoError(t, err)
	fillAt(t, st.Origin(), 5, 0, 16<<10)
	require.NoError(t, st.Close())

	st, err = Open(blockdev.ReadOnly(origin), store, Options{})
	require.NoError(t, err)
	defer st.Close()
	before := mustOpen(t, st, "before")
	require.ErrorIs(t, st.Rollback(context.Background(), st.Origin(), before), ErrReadOnly)
	mustCheck(t, st)
}
