package nbd

// Tests against clients nobody here wrote: qemu-io, qemu-img, nbdcopy,
// nbdinfo and fio's nbd engine, each against a server started in-process.
// Each skips, saying why, where its tool is missing.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// need skips the test unless every tool is on PATH.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install qemu-utils libnbd-bin nbdkit fio): %v", tool, err)
		}
	}
}

// run runs a command with a deadline and returns its combined output; it
// fails the test on a non-zero exit.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runErr(t, name, args...)
	require.NoError(t, err, "%s %s:\n%s", name, strings.Join(args, " "), out)
	return out
}

func runErr(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	return runCtx(t.Context(), name, args...)
}

// runCleanup runs a command from a t.Cleanup function, when the test's
// context has already ended.
func runCleanup(name string, args ...string) (string, error) {
	return runCtx(context.Background(), name, args...)
}

func runCtx(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// nbdsh and friends want Debian's python and tools first.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/usr/sbin:/bin:/sbin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// randomFile writes size bytes: random data with a zero hole in the
// middle third, so sparse-aware tools have something to skip.
func randomFile(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	clear(b[size/3 : 2*size/3])
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return b
}

func TestQemuIO(t *testing.T) {
	need(t, "qemu-io")
	mem := blockdevtest.NewMem(t, 64<<20, 512)
	dev := &counting{Device: mem}
	ts := startServer(t, Options{}, Export{Name: "disk", Device: dev})
	uri := ts.uri("disk")
	out := run(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 64k",
		"-c", "read -P 0xab 0 64k",
		"-c", "flush",
		"-c", "write -P 0x11 1M 64k",
		"-c", "discard 1M 64k",
		"-c", "read -P 0 1M 64k",
		"-c", "write -f -P 0xcd 2M 64k",
		"-c", "read -P 0xcd 2M 64k",
		"-c", "write -P 0x22 3M 128k",
		"-c", "write -z 3M 64k",
		"-c", "read -P 0 3M 64k",
		"-c", "read -P 0x22 3136k 64k",
		"-c", "aio_write -P 0x5a 8M 4k",
		"-c", "aio_write -P 0x5b 9M 4k",
		"-c", "aio_flush",
		"-c", "read -P 0x5a 8M 4k",
		"-c", "read -P 0x5b 9M 4k",
	)
	require.NotContains(t, out, "Pattern verification failed", out)
	require.NotContains(t, out, "error", out)
	// Each feature reached the device as itself.
	require.Positive(t, dev.n(opFUA), "FUA writes")
	require.Positive(t, dev.n(opFlush), "flushes")
	require.Positive(t, dev.n(opDiscard), "discards")
	require.GreaterOrEqual(t, dev.n(opZero)+dev.n(opDiscard), int64(2), "discard and write -z")

	// What qemu wrote is what the device holds.
	p := make([]byte, 64<<10)
	_, err := mem.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{0xab}, 64<<10), p)
	_, err = mem.ReadAt(p, 2<<20)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{0xcd}, 64<<10), p)
}

func TestQemuIOReadOnly(t *testing.T) {
	need(t, "qemu-io")
	mem := blockdevtest.NewMem(t, 16<<20, 512)
	_, err := mem.WriteAt(bytes.Repeat([]byte{0x42}, 4096), 0)
	require.NoError(t, err)
	ts := startServer(t, Options{}, Export{Name: "ro", Device: mem, ReadOnly: true})
	out := run(t, "qemu-io", "-r", "-f", "raw", ts.uri("ro"), "-c", "read -P 0x42 0 4k")
	require.NotContains(t, out, "Pattern verification failed", out)
	// Opening read-write must fail, or at least the write must.
	out, _ = runErr(t, "qemu-io", "-f", "raw", ts.uri("ro"), "-c", "write -P 0x1 0 4k")
	require.True(t, strings.Contains(out, "read-only") || strings.Contains(out, "ermission") ||
		strings.Contains(out, "not permitted"), "write to a read-only export: %s", out)
	p := make([]byte, 4096)
	_, err = mem.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{0x42}, 4096), p)
}

func TestQemuImg(t *testing.T) {
	need(t, "qemu-img")
	if testing.Short() {
		t.Skip("short mode")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	want := randomFile(t, src, 8<<20, 1)
	dev, err := blockdev.Create(filepath.Join(dir, "export.img"), 8<<20, blockdev.FileOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	ts := startServer(t, Options{}, Export{Name: "disk", Device: dev})
	uri := ts.uri("disk")

	run(t, "qemu-img", "info", uri)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	out := filepath.Join(dir, "out.img")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Equal(t, sha256.Sum256(want), sha256.Sum256(got))

	// The hole in the middle reads as zero through block status.
	var extents []struct {
		Start, Length int64
		Data, Zero    bool
	}
	require.NoError(t, json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)), &extents))
	sawZero := false
	for _, e := range extents {
		sawZero = sawZero || (e.Zero && e.Start >= 8<<20/3)
	}
	require.True(t, sawZero, "qemu-img map shows no zero extent: %+v", extents)
}

func TestNbdcopy(t *testing.T) {
	need(t, "nbdcopy")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	want := randomFile(t, src, 8<<20, 2)
	ts := startServer(t, Options{}, Export{Name: "disk", Device: blockdevtest.NewMem(t, 8<<20, 512)})
	uri := ts.uri("disk")
	run(t, "nbdcopy", src, uri)
	dst := filepath.Join(dir, "dst.img")
	require.NoError(t, os.WriteFile(dst, nil, 0o644))
	run(t, "nbdcopy", uri, dst)
	got, err := os.ReadFile(dst)
	require.NoError(t, err)
	require.Equal(t, sha256.Sum256(want), sha256.Sum256(got))
}

func TestNbdinfo(t *testing.T) {
	need(t, "nbdinfo")
	mem := blockdevtest.NewMem(t, 4<<20, 512)
	_, err := mem.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 0)
	require.NoError(t, err)
	ts := startServer(t, Options{}, Export{Name: "rw", Device: mem},
		Export{Name: "ro", Device: mem, ReadOnly: true})

	for _, f := range []string{"flush", "trim", "fua", "zero", "fast-zero", "multi-conn", "cache"} {
		run(t, "nbdinfo", "--can", f, ts.uri("rw"))
	}
	for _, f := range []string{"trim", "fua", "zero"} {
		out, err := runErr(t, "nbdinfo", "--can", f, ts.uri("ro"))
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "read-only export claims --can %s: %s", f, out)
		require.Equal(t, 2, ee.ExitCode(), out)
	}
	run(t, "nbdinfo", "--is", "read-only", ts.uri("ro"))

	out := run(t, "nbdinfo", "--map", ts.uri("rw"))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, out)
	require.Equal(t, []string{"0", "65536", "0", "data"}, strings.Fields(lines[0]))
	require.Equal(t, []string{"65536", "4128768", "3", "hole,zero"}, strings.Fields(lines[1]))

	// The empty name selects the default (first) export.
	out = run(t, "nbdinfo", "--size", URI(ts.addr, ""))
	require.Equal(t, "4194304", strings.TrimSpace(out))
	out = run(t, "nbdinfo", "--list", URI(ts.addr, ""))
	require.Contains(t, out, "rw")
	require.Contains(t, out, "ro")
}

func TestFioVerify(t *testing.T) {
	need(t, "fio")
	if testing.Short() {
		t.Skip("short mode")
	}
	if out, _ := runErr(t, "fio", "--enghelp=nbd"); !strings.Contains(out, "uri") {
		t.Skipf("fio has no nbd engine: %s", out)
	}
	ts := startServer(t, Options{}, Export{Name: "disk", Device: blockdevtest.NewMem(t, 16<<20, 512)})
	for _, rw := range []string{"randwrite", "write"} {
		out := run(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+ts.uri("disk"),
			"--rw="+rw, "--bs=4k", "--iodepth=32", "--size=16m",
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
			"--verify_state_save=0") // no state file left in the package directory
		require.Contains(t, out, "err= 0", out)
		require.NotContains(t, out, "verify: bad", out)
	}
}
