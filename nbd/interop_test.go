package nbd

// The client against servers nobody here wrote: nbdkit's memory plugin and
// qemu-nbd. Each skips, saying why, where its tool is missing.

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// startExternal runs a server process that listens on the Unix socket
// sock, waits until the socket accepts connections and kills the process
// when the test ends.
func startExternal(t *testing.T, sock string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		nc, err := net.Dial("unix", sock)
		if err == nil {
			nc.Close()
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("%s exited before listening: %v\n%s", name, err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening on %s: %v\n%s", name, sock, err, out.String())
		}
		runtime.Gosched()
	}
}

func unixURI(sock, export string) string {
	return URI(&net.UnixAddr{Name: sock, Net: "unix"}, export)
}

func TestInteropNbdkitMemory(t *testing.T) {
	need(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	startExternal(t, sock, "nbdkit", "-f", "--exit-with-parent", "-U", sock, "memory", "64M")
	uri := unixURI(sock, "")

	c := dial(t, uri)
	info := c.Info()
	require.Equal(t, int64(64<<20), info.Size)
	require.True(t, info.Structured)
	require.True(t, info.BlockStatus)
	require.True(t, info.Zeroes)
	checkAllocation(t, c)

	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		c, err := Dial(context.Background(), uri)
		require.NoError(t, err)
		return c
	})
}

func TestInteropQemuNbd(t *testing.T) {
	need(t, "qemu-nbd")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	f, err := os.Create(img)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(64<<20))
	require.NoError(t, f.Close())
	sock := filepath.Join(dir, "qemu.sock")
	startExternal(t, sock, "qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "--shared=16", "--cache=writeback", img)
	uri := unixURI(sock, "")

	c := dial(t, uri)
	require.Equal(t, int64(64<<20), c.Size())
	require.True(t, c.Info().Flush)
	checkAllocation(t, c)

	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		c, err := Dial(context.Background(), uri)
		require.NoError(t, err)
		return c
	})
}

// checkAllocation writes data at 1 MiB of a fresh export and checks that
// MapAllocation tells it from the holes around it.
func checkAllocation(t *testing.T, c *Client) {
	t.Helper()
	_, err := c.WriteAt(bytes.Repeat([]byte{0xaa}, 64<<10), 1<<20)
	require.NoError(t, err)
	l, st, err := c.MapAllocation(0, 1<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Hole, st)
	require.Equal(t, int64(1<<20), l)
	l, st, err = c.MapAllocation(1<<20, 4<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, st)
	require.Equal(t, int64(64<<10), l)
	require.NoError(t, c.Discard(1<<20, 64<<10))
	got := make([]byte, 64<<10)
	_, err = c.ReadAt(got, 1<<20)
	require.NoError(t, err)
	require.Equal(t, make([]byte, 64<<10), got)
}
