package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"
)

// daemon is a blocksnap process running in the background (serve,
// hydrate --serve) that printed its serveInfo as JSON.
type daemon struct {
	cmd    *exec.Cmd
	info   serveInfo
	stderr *syncBuffer
	done   chan error
}

// syncBuffer is a daemon's stderr: written by exec's copying goroutine,
// read by the test while the daemon runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitStderr polls, with a deadline, until the daemon has written substr
// on stderr.
func (d *daemon) waitStderr(t *testing.T, substr string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(d.stderr.String(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("daemon stderr did not show %q within a minute: %s", substr, d.stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(binary, args...)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	d := &daemon{cmd: cmd, stderr: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = d.stderr
	require.NoError(t, cmd.Start())
	// Whatever happens, the process does not outlive the test.
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-d.done
		}
	})
	dec := json.NewDecoder(bufio.NewReader(out))
	infoErr := dec.Decode(&d.info)
	go func() {
		io.Copy(io.Discard, out)
		d.done <- cmd.Wait()
	}()
	require.NoError(t, infoErr, "daemon stderr: %s", d.stderr)
	return d
}

// stop sends SIGTERM and requires a clean exit.
func (d *daemon) stop(t *testing.T) {
	t.Helper()
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-d.done:
		require.NoError(t, err, "daemon stderr: %s", d.stderr)
	case <-time.After(60 * time.Second):
		t.Fatalf("daemon did not stop within a minute after SIGTERM; stderr: %s", d.stderr)
	}
}

// needTool skips the test, naming the Debian package to install, when a
// real client it runs is missing.
func needTool(t *testing.T, name string) {
	t.Helper()
	pkg := "qemu-utils"
	if strings.HasPrefix(name, "nbd") {
		pkg = "libnbd-bin"
	}
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s is not installed (apt-get install -y %s); skipping the real-client test", name, pkg)
	}
}

// qemuIO runs qemu-io on an NBD URI and returns its output; a pattern
// mismatch fails the test.
func qemuIO(t *testing.T, uri string, ro bool, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	if ro {
		args = append(args, "-r")
	}
	args = append(args, uri)
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	require.NoError(t, err, "qemu-io %v: %s", args, out)
	require.NotContains(t, string(out), "Pattern verification failed", "qemu-io %v", args)
	require.NotContains(t, string(out), "failed", "qemu-io %v", args)
	return string(out)
}

// With serve running: qemu-io writes a pattern to origin, a snapshot is
// taken through the control socket, the origin is overwritten, and the
// snapshot export still shows the first pattern; clones, list, stat, diff
// and delete work live; the store is locked; SIGTERM drains and the store
// checks clean afterwards.
func TestServeWithQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	f := newFixture(t)
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	require.Equal(t, []string{"origin"}, d.info.Exports)
	require.Equal(t, f.store+".control", d.info.Control)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }

	qemuIO(t, uri("origin"), false, "write -P 0xab 0 1M", "flush")
	require.Contains(t, ok(t, f.args("snapshot", "snap1")...), "created snapshot snap1 of origin")
	qemuIO(t, uri("origin"), false, "write -P 0xcd 0 1M", "flush")
	qemuIO(t, uri("snap1"), true, "read -P 0xab 0 1M")
	qemuIO(t, uri("origin"), true, "read -P 0xcd 0 1M")
	// The default export is the origin.
	qemuIO(t, "nbd://"+d.info.Listen, true, "read -P 0xcd 0 1M")

	// A snapshot export is read-only; a clone is writable and independent.
	out, err := exec.Command("qemu-io", "-f", "raw", uri("snap1"), "-c", "write -P 1 0 4k").CombinedOutput()
	require.Error(t, err, "a write to a snapshot export must fail: %s", out)
	require.Contains(t, string(out), "Permission denied")
	ok(t, f.args("clone", "vm1", "--from", "snap1")...)
	qemuIO(t, uri("vm1"), false, "read -P 0xab 0 1M", "write -P 0xee 64k 64k", "flush")
	qemuIO(t, uri("snap1"), true, "read -P 0xab 0 1M")

	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	require.Len(t, vs, 3)
	var st control.VolumeStat
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("stat", "vm1", "--json")...)), &st))
	require.Equal(t, int64(64<<10), st.Exclusive)
	require.Contains(t, ok(t, f.args("diff", "snap1")...), "1MiB changed from snap1 to origin")

	// The store is locked against commands that need it whole; the error
	// names the server and says what to do.
	holder := fmt.Sprintf("is in use by blocksnap serve (pid %d, control socket %s)", d.cmd.Process.Pid, d.info.Control)
	fails(t, 1, holder+"; stop it first", f.args("format", "--force")...)
	fails(t, 1, holder+"; one serve per store", f.args("serve", "--listen", "127.0.0.1:0")...)

	// Export from the live server (through the control socket), applied
	// onto a blank file, equals the snapshot (checked after the server
	// stops, when this test can open the store).
	backup := filepath.Join(f.dir, "snap1.bsd")
	require.Contains(t, ok(t, f.args("export-diff", "snap1", "-o", backup)...), "full export of snap1 written to")
	restored := filepath.Join(f.dir, "restored.img")
	ok(t, "apply-diff", "--target", restored, "-i", backup)
	fails(t, 1, "TO origin is a origin, not a snapshot", f.args("export-diff", "origin", "-o", backup)...)
	// The same, zstd-compressed: a smaller stream, the same image.
	zbackup := filepath.Join(f.dir, "snap1.bsd.zst")
	ok(t, f.args("export-diff", "snap1", "--compress", "-o", zbackup)...)
	zrestored := filepath.Join(f.dir, "zrestored.img")
	ok(t, "apply-diff", "--target", zrestored, "-i", zbackup)
	require.Less(t, len(readFile(t, zbackup)), len(readFile(t, backup)))
	require.Equal(t, readFile(t, restored), readFile(t, zrestored))

	// Delete live: the export is withdrawn at once; a new volume of the
	// same name is served at once.
	require.Contains(t, ok(t, f.args("delete", "vm1")...), "deleted vm1; reclaimed", "delete waits for the space, live too")
	out, _ = exec.Command("qemu-io", "-f", "raw", "-r", uri("vm1"), "-c", "read 0 4k").CombinedOutput()
	require.Contains(t, string(out), "Requested export not available", "%s", out)
	ok(t, f.args("snapshot", "vm1")...)
	qemuIO(t, uri("vm1"), true, "read -P 0xcd 0 1M")
	fails(t, 1, `no such volume: "ghost"`, f.args("delete", "ghost")...)

	// check and dump read the live state; rename moves the export;
	// rollback rewrites the live origin.
	var rep control.CheckReport
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("check", "--json")...)), &rep))
	require.True(t, rep.OK && rep.Live, "%+v", rep)
	var dump control.Dump
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("dump")...)), &dump))
	var kinds []string
	for _, v := range dump.Volumes {
		kinds = append(kinds, v.Name+":"+v.Against)
		if v.Name == "snap1" {
			require.Equal(t, []control.Extent{{Off: 0, Len: 1 << 20}}, v.Extents, "snap1 holds the MiB the origin overwrote")
		}
	}
	require.Equal(t, "origin: snap1:origin vm1:origin", strings.Join(kinds, " "))
	var sp control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("usage", "--json")...)), &sp))
	require.Equal(t, dump.Space.ChunkSize, sp.ChunkSize)
	require.NotZero(t, sp.UsedBytes)
	require.Contains(t, ok(t, f.args("rename", "vm1", "vm2")...), "renamed vm1 to vm2")
	qemuIO(t, uri("vm2"), true, "read -P 0xcd 0 1M")
	out, _ = exec.Command("qemu-io", "-f", "raw", "-r", uri("vm1"), "-c", "read 0 4k").CombinedOutput()
	require.Contains(t, string(out), "Requested export not available", "%s", out)
	fails(t, 1, "vm2 is not a snapshot of snap1", f.args("rollback", "snap1", "--to", "vm2")...)
	require.Contains(t, ok(t, f.args("rollback", "origin", "--to", "snap1")...), "rolled origin back to snap1")
	qemuIO(t, uri("origin"), true, "read -P 0xab 0 1M")

	d.stop(t)
	require.Contains(t, ok(t, f.args("check")...), "is clean (3 volumes)")
	_, err = os.Stat(d.info.Control)
	require.True(t, os.IsNotExist(err), "the control socket is removed on exit")
	snap := f.image(t, "snap1")
	require.Equal(t, snap, readFile(t, restored))
	require.Equal(t, bytes.Repeat([]byte{0xab}, 1<<20), snap[:1<<20])
	require.Equal(t, snap, f.image(t, "origin"), "rolled back")
	require.Equal(t, bytes.Repeat([]byte{0xcd}, 1<<20), f.image(t, "vm2")[:1<<20])
}

// A stale control socket file (a server that died) does not stop the next
// serve; a Unix NBD socket works.
func TestServeStaleControlAndUnixSocket(t *testing.T) {
	needTool(t, "qemu-io")
	f := newFixture(t)
	require.NoError(t, os.WriteFile(f.store+".control", nil, 0o644))
	sock := filepath.Join(f.dir, "nbd.sock")
	d := startDaemon(t, f.args("serve", "--listen", "", "--socket", sock, "--json")...)
	require.Equal(t, sock, d.info.Socket)
	qemuIO(t, "nbd+unix:///origin?socket="+sock, false, "write -P 0x5a 0 64k")
	d.stop(t)
	require.Equal(t, bytes.Repeat([]byte{0x5a}, 64<<10), f.image(t, "origin")[:64<<10])
}
