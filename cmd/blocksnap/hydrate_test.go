package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/nbd"
)

func randomImage(t *testing.T, seed uint64, size int) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 9))
	p := make([]byte, size)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	clear(p[size/4 : size/2]) // a zero range hydrates without a copy
	return p
}

// serveImage serves p over NBD from this process and returns its URI.
func serveImage(t *testing.T, p []byte) string {
	t.Helper()
	m, err := blockdev.NewMem(int64(len(p)), 512)
	require.NoError(t, err)
	_, err = m.WriteAt(p, 0)
	require.NoError(t, err)
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "golden", Device: m, ReadOnly: true})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		srv.Serve(context.Background(), l)
		close(done)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return nbd.URI(l.Addr(), "golden")
}

// waitStatus polls `blocksnap status` until cond holds (a minute at most):
// for a status no running child is to reach.
func waitStatus(t *testing.T, flags []string, cond func(control.CloneStatus) bool) control.CloneStatus {
	t.Helper()
	return waitStatusOf(t, nil, flags, cond)
}

// child is a blocksnap run in the background: done closes when it has
// exited, and then err and stderr say how.
type child struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

// startChild starts blocksnap with args in the background.
func startChild(t *testing.T, args ...string) *child {
	t.Helper()
	c := &child{cmd: exec.Command(binary, args...), done: make(chan struct{})}
	c.cmd.Stderr = &c.stderr
	require.NoError(t, c.cmd.Start())
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		_ = c.cmd.Process.Kill()
		<-c.done
	})
	return c
}

// waitStatusOf polls status until cond holds. With c nil it gives up
// after a minute. With a child c, it waits as long as c runs (a slow disk
// makes the child slow, not wrong; the test's own deadline still bounds
// it), and fails at once, with the child's stderr, if c exits first: a
// child that died is not mistaken for one that is slow.
func waitStatusOf(t *testing.T, c *child, flags []string, cond func(control.CloneStatus) bool) control.CloneStatus {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		r := bs(t, nil, append([]string{"status", "--json"}, flags...)...)
		var st control.CloneStatus
		if r.code == 0 {
			require.NoError(t, json.Unmarshal([]byte(r.stdout), &st))
			if cond(st) {
				return st
			}
		}
		if c != nil {
			select {
			case <-c.done:
				t.Fatalf("the child exited (%v) before status reached the condition; last: %+v %s; its stderr: %s",
					c.err, st, r.stderr, c.stderr.String())
			default:
			}
		} else if time.Now().After(deadline) {
			t.Fatalf("status never reached the condition; last: %+v %s", st, r.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestHydrateFromFile(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	img := randomImage(t, 1, 4<<20)
	require.NoError(t, os.WriteFile(src, img, 0o644))
	flags := []string{"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", filepath.Join(dir, "meta")}

	fails(t, 1, "holds no clone", append([]string{"status"}, flags...)...)
	out := ok(t, append([]string{"hydrate"}, flags...)...)
	require.Contains(t, out, "hydrated: 64 of 64 regions hydrated (100.0%)")
	require.Equal(t, img, readFile(t, flags[3]))
	require.Contains(t, ok(t, append([]string{"status"}, flags...)...), "hydrated: 64 of 64")
	// Running it again is a no-op that finds everything hydrated.
	require.Contains(t, ok(t, append([]string{"hydrate"}, flags...)...), "64 of 64")

	fails(t, 1, "/nope does not exist", "hydrate", "--source", filepath.Join(dir, "nope"), "--dest", filepath.Join(dir, "d2"), "--meta", filepath.Join(dir, "m2"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "junk"), bytes.Repeat([]byte{7}, 1<<20), 0o644))
	fails(t, 1, "holds no valid clone metadata", "status", "--source", src, "--dest", flags[3], "--meta", filepath.Join(dir, "junk"))
}

// Hydrate from an NBD source while serving the clone: qemu-io reads the
// source's data through the clone at once, status comes from the running
// process through its control socket, an interrupted hydration resumes.
func TestHydrateFromNBDWhileServing(t *testing.T) {
	needTool(t, "qemu-io")
	dir := t.TempDir()
	img := randomImage(t, 2, 8<<20)
	for i := range 64 << 10 {
		img[i] = 0x3c
	}
	uri := serveImage(t, img)
	dest := filepath.Join(dir, "dest.img")
	flags := []string{"--source", uri, "--dest", dest, "--meta", filepath.Join(dir, "meta")}

	// First run: slow, stopped by SIGTERM once some regions are in.
	d := startDaemon(t, append([]string{"hydrate", "--serve", "127.0.0.1:0", "--rate", "2MiB", "--json"}, flags...)...)
	require.Equal(t, []string{"clone"}, d.info.Exports)
	qemuIO(t, "nbd://"+d.info.Listen+"/clone", true, "read -P 0x3c 0 64k")
	st := waitStatus(t, flags, func(s control.CloneStatus) bool { return s.Hydrated > 0 })
	require.Equal(t, uint64(128), st.Regions)
	qemuIO(t, "nbd://"+d.info.Listen+"/clone", false, "write -P 0x77 1M 64k", "flush")
	d.stop(t)
	st = waitStatus(t, flags, func(control.CloneStatus) bool { return true })
	t.Logf("after the first run: %+v", st)

	// Second run (no --serve): finishes the rest and exits.
	out := ok(t, append([]string{"hydrate"}, flags...)...)
	require.Contains(t, out, "128 of 128 regions hydrated")
	want := bytes.Clone(img)
	copy(want[1<<20:], bytes.Repeat([]byte{0x77}, 64<<10))
	require.Equal(t, want, readFile(t, dest))
}

// A hydrate without --serve stops on SIGINT, saying it can resume.
func TestHydrateInterrupted(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, randomImage(t, 3, 8<<20), 0o644))
	flags := []string{"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", filepath.Join(dir, "meta")}
	c := startChild(t, append([]string{"hydrate", "--rate", "1MiB"}, flags...)...)
	waitStatusOf(t, c, flags, func(s control.CloneStatus) bool { return s.Hydrated > 0 && s.State == "hydrating" })
	require.NoError(t, c.cmd.Process.Signal(syscall.SIGINT))
	<-c.done
	var ee *exec.ExitError
	require.ErrorAs(t, c.err, &ee)
	require.Equal(t, 1, ee.ExitCode())
	require.Contains(t, c.stderr.String(), "interrupted; hydration resumes where it stopped")
	st := waitStatus(t, flags, func(control.CloneStatus) bool { return true })
	require.Equal(t, "stopped", st.State)
	require.Less(t, st.Hydrated, st.Regions)
}

// hydrate --connections reads an nbd:// source over several connections
// (the export allows it) and ends with the source's bytes.
func TestHydrateMultiConnection(t *testing.T) {
	dir := t.TempDir()
	img := randomImage(t, 7, 4<<20)
	uri := serveImage(t, img)
	dest := filepath.Join(dir, "dest.img")
	fails(t, 2, "--connections -1: want 0 or more", "hydrate", "--source", uri, "--dest", dest, "--meta", filepath.Join(dir, "meta"), "--connections", "-1")
	out := ok(t, "hydrate", "--source", uri, "--dest", dest, "--meta", filepath.Join(dir, "meta"), "--connections", "4")
	require.Contains(t, out, "64 of 64 regions hydrated")
	require.Equal(t, img, readFile(t, dest))
}
