package nbd

// A real file system on the server: nbdfuse shows the export as a file,
// a loop device makes it a block device, ext4 is made, mounted, written,
// unmounted and checked, then read back through a second connection.
// Needs root, /dev/fuse and loop devices; skips otherwise.

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func needFuseLoop(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and mount")
	}
	for _, dev := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(dev); err != nil {
			t.Skipf("%s missing: %v", dev, err)
		}
	}
	need(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
}

// fuseAttach shows uri as a file with nbdfuse, attaches a loop device to
// it and returns the device; everything is undone when the test ends,
// failed or not.
func fuseAttach(t *testing.T, uri string, readOnly bool) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "fuse")
	require.NoError(t, os.Mkdir(dir, 0o755))
	args := []string{}
	if readOnly {
		args = append(args, "--readonly")
	}
	cmd := exec.Command("nbdfuse", append(args, filepath.Join(dir, "disk"), uri)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// A loop device just detached may hold the file a moment
		// longer, keeping the mount busy: retry, then unmount lazily.
		for deadline := time.Now().Add(10 * time.Second); ; {
			if _, err := runCleanup("fusermount3", "-u", dir); err == nil {
				break
			}
			if time.Now().After(deadline) {
				runCleanup("fusermount3", "-u", "-z", dir)
				break
			}
			time.Sleep(20 * time.Millisecond) // polling the kernel, not a goroutine
		}
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	disk := filepath.Join(dir, "disk")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if st, err := os.Stat(disk); err == nil && st.Size() > 0 {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("nbdfuse exited: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse did not show %s\n%s", disk, out.String())
		}
		time.Sleep(10 * time.Millisecond) // polling an external process, not a goroutine
	}
	largs := []string{"--find", "--show"}
	if readOnly {
		largs = append(largs, "--read-only")
	}
	loop := strings.TrimSpace(run(t, "losetup", append(largs, disk)...))
	t.Cleanup(func() { runCleanup("losetup", "-d", loop) })
	return loop
}

func mountLoop(t *testing.T, loop string, readOnly bool) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	args := []string{loop, mnt}
	if readOnly {
		args = append([]string{"-o", "ro"}, args...)
	}
	run(t, "mount", args...)
	t.Cleanup(func() {
		runCleanup("umount", mnt)
	})
	return mnt
}

// TestFuseExt4 runs on a 512-byte-block export and on a 4 KiB-block one:
// the loop device keeps its default 512-byte sectors, so on the second the
// server serves sub-block requests by read-modify-write.
func TestFuseExt4(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprintf("bs=%d", bs), func(t *testing.T) { testFuseExt4(t, bs) })
	}
}

func testFuseExt4(t *testing.T, bs int) {
	needFuseLoop(t)
	mem := blockdevtest.NewMem(t, 64<<20, bs)
	ts := startServer(t, Options{}, Export{Name: "fs", Device: mem})
	uri := ts.uri("fs")

	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 0))
	files := map[string][32]byte{}

	loop := fuseAttach(t, uri, false)
	run(t, "mkfs.ext4", "-q", "-F", loop)
	mnt := mountLoop(t, loop, false)
	for i := range 16 {
		b := make([]byte, 1+rng.IntN(512<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		name := fmt.Sprintf("f%02d", i)
		require.NoError(t, os.WriteFile(filepath.Join(mnt, name), b, 0o644))
		files[name] = sha256.Sum256(b)
	}
	run(t, "umount", mnt)
	run(t, "e2fsck", "-fn", loop)
	run(t, "losetup", "-d", loop)

	// A second connection sees the same file system.
	loop2 := fuseAttach(t, uri, true)
	out := run(t, "e2fsck", "-fn", loop2)
	t.Log(strings.TrimSpace(out))
	mnt2 := mountLoop(t, loop2, true)
	for name, sum := range files {
		b, err := os.ReadFile(filepath.Join(mnt2, name))
		require.NoError(t, err)
		require.Equal(t, sum, sha256.Sum256(b), name)
	}
}
