package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"
)

// nbdMap is `nbdinfo --map` of an export: one "OFFSET LENGTH DESCRIPTION"
// string per extent.
func nbdMap(t *testing.T, uri string) []string {
	t.Helper()
	out, err := exec.Command("nbdinfo", "--map", uri).CombinedOutput()
	require.NoError(t, err, "nbdinfo --map %s: %s", uri, out)
	var m []string
	line := regexp.MustCompile(`^\s*(\d+)\s+(\d+)\s+\d+\s+(\S+)$`)
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := line.FindStringSubmatch(l)
		require.NotNil(t, f, "nbdinfo --map %s: line %q", uri, l)
		m = append(m, f[1]+" "+f[2]+" "+f[3])
	}
	return m
}

// The VM manager's flow against `blocksnap serve` on a pool (a store with
// no origin), with real clients only (qemu-io, qemu-img, nbdinfo): a
// sparse golden image made with qemu-io is imported, snapshotted and
// cloned three times, and a blank 2 GiB data volume is created; each
// clone maps holes where golden has them; a clone is written, then reset
// to golden while a qemu-io stays connected, and that client reads
// golden's bytes; a clone shrunk under that client fails its reads past
// the new end, and a grown one shows its new size in qemu-img info; a
// clone's snapshot is backed up as an incremental from golden, applied
// onto a copy of golden and compared with qemu-img; the store is filled
// through a clone, serve warns at the low-water mark, qemu-io gets ENOSPC,
// and after a delete the store takes writes again.
func TestVMManagerFlow(t *testing.T) {
	for _, tool := range []string{"qemu-io", "qemu-img", "nbdinfo"} {
		needTool(t, tool)
	}
	dir := t.TempDir()
	store := filepath.Join(dir, "pool.img")
	pool := func(args ...string) []string { return poolArgs(store, args...) }
	ok(t, pool("format", "--size", "16MiB", "--chunk-size", "64KiB")...)
	d := startDaemon(t, pool("serve", "--listen", "127.0.0.1:0", "--json")...)
	require.Empty(t, d.info.Exports, "a new pool has no volumes")
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }

	// The golden image, written by qemu-io into a sparse raw file: data
	// at 0 (1 MiB) and 8 MiB (512 KiB), holes elsewhere. Imported, it
	// costs only its data, and the running serve exports it at once.
	img := filepath.Join(dir, "golden.raw")
	out, err := exec.Command("qemu-img", "create", "-f", "raw", img, "16M").CombinedOutput()
	require.NoError(t, err, "%s", out)
	out, err = exec.Command("qemu-io", "-f", "raw", img, "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 8M 512k").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, ok(t, pool("import", "golden", img)...), "as volume golden (16MiB, uuid ")
	var u control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, pool("usage", "--json")...)), &u))
	require.Equal(t, int64(1536<<10), u.UsedBytes, "the import stored only golden's data")
	golden := []string{"0 1048576 data", "1048576 7340032 hole,zero", "8388608 524288 data", "8912896 7864320 hole,zero"}
	require.Equal(t, golden, nbdMap(t, uri("golden")))
	compare(t, img, uri("golden"))
	// With no origin, the default export is the first volume served.
	qemuIO(t, "nbd://"+d.info.Listen, true, "read -P 0xa1 0 1M", "read -P 0xa2 8M 512k")
	ok(t, pool("snapshot", "golden-v1", "--of", "golden")...)
	require.Equal(t, golden, nbdMap(t, uri("golden-v1")))
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		ok(t, pool("clone", vm, "--from", "golden-v1")...)
		require.Equal(t, golden, nbdMap(t, uri(vm)), "%s maps holes where golden has them", vm)
	}
	require.Contains(t, ok(t, pool("create", "data1", "--size", "2GiB")...), "created volume data1 (2GiB, uuid ")
	require.Equal(t, []string{"0 2147483648 hole,zero"}, nbdMap(t, uri("data1")))
	require.Contains(t, qemuImgInfo(t, uri("data1")), "virtual size: 2 GiB (2147483648 bytes)")
	qemuIO(t, uri("data1"), false, "write -P 0xda 1G 64k", "flush", "read -P 0xda 1G 64k", "read -P 0 0 1M")
	// The other way in: qemu-img convert copies golden onto a blank
	// volume through NBD. Its zeroing of the holes (WRITE_ZEROES) takes
	// no store space, so the copy maps, and costs, what golden does.
	ok(t, pool("create", "copy", "--size", "16MiB")...)
	out, err = exec.Command("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, uri("copy")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Equal(t, golden, nbdMap(t, uri("copy")))
	compare(t, img, uri("copy"))
	var u2 control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, pool("usage", "--json")...)), &u2))
	require.Equal(t, u.UsedBytes+1536<<10+64<<10, u2.UsedBytes, "golden's data again, and data1's chunk")
	ok(t, pool("delete", "copy", "--force")...) // forced: qemu-img's connections may still be closing

	// vm1 is written (over data and into a hole), then reset to golden
	// while this qemu-io stays connected: its next reads see golden.
	q := startQemuIO(t, uri("vm1"))
	require.Contains(t, q.do(t, "write -P 0xee 0 64k", "wrote"), "wrote 65536/65536 bytes")
	require.Contains(t, q.do(t, "write -P 0xef 4M 64k", "wrote"), "wrote 65536/65536 bytes")
	require.Contains(t, q.do(t, "read -P 0xef 4M 64k", "read"), "read 65536/65536 bytes")
	require.NotEqual(t, golden, nbdMap(t, uri("vm1")))
	require.Contains(t, ok(t, pool("rollback", "vm1", "--to", "golden-v1")...), "rolled vm1 back to golden-v1")
	for _, c := range []string{"read -P 0xa1 0 1M", "read -P 0 4M 64k", "read -P 0xa2 8M 512k"} {
		out := q.do(t, c, "read ", "failed")
		require.NotContains(t, out, "failed", "%s after the reset, on the connection open across it", c)
		require.Contains(t, out, "read ", "%s after the reset", c)
	}
	require.Equal(t, golden, nbdMap(t, uri("vm1")), "the reset to the clone's base is metadata: the holes are back")
	// A shrink under the connected client: it learnt the old size at its
	// handshake, so a read past the new end gets an error (EINVAL), and
	// the connection carries on.
	require.Contains(t, ok(t, pool("resize", "vm1", "--size", "8MiB", "--shrink")...), "resized vm1 to 8MiB")
	require.Contains(t, q.do(t, "read 12M 64k", "read "), "read failed: Invalid argument")
	require.Contains(t, q.do(t, "read -P 0xa1 0 64k", "read ", "failed"), "read 65536/65536 bytes")
	require.Contains(t, qemuImgInfo(t, uri("vm1")), "virtual size: 8 MiB (8388608 bytes)")

	// vm3 grows; a new connection sees the new size, and the grown range
	// reads as zeros and maps as a hole.
	require.Contains(t, ok(t, pool("resize", "vm3", "--size", "32MiB")...), "resized vm3 to 32MiB")
	require.Contains(t, qemuImgInfo(t, uri("vm3")), "virtual size: 32 MiB (33554432 bytes)")
	require.Equal(t, append(golden[:3:3], "8912896 24641536 hole,zero"), nbdMap(t, uri("vm3")))
	qemuIO(t, uri("vm3"), true, "read -P 0xa1 0 1M", "read -P 0 16M 16M")

	// A backup of vm2 as an incremental from golden: golden-v1 exported
	// in full and applied makes a copy of golden; the diff from golden-v1
	// to a snapshot of vm2, exported through serve and applied onto that
	// copy, gives the snapshot, byte for byte (qemu-img compare reads the
	// file and the snapshot's export). The stream carries only what vm2
	// changed.
	qemuIO(t, uri("vm2"), false, "write -P 0x22 2M 1M", "write -z 8M 64k", "flush")
	ok(t, pool("snapshot", "vm2-s1", "--of", "vm2")...)
	require.Contains(t, ok(t, pool("diff", "golden-v1", "vm2-s1")...), "2 extents, 1.062MiB changed from golden-v1 to vm2-s1")
	full, incr := filepath.Join(dir, "golden-v1.bsd"), filepath.Join(dir, "vm2-s1.bsd")
	copyOfGolden := filepath.Join(dir, "vm2.img")
	ok(t, pool("export-diff", "golden-v1", "-o", full)...)
	ok(t, "apply-diff", "--target", copyOfGolden, "-i", full)
	compare(t, copyOfGolden, uri("golden-v1"))
	var sum streamSummary
	require.NoError(t, json.Unmarshal([]byte(ok(t, pool("export-diff", "vm2-s1", "--from", "golden-v1", "-o", incr, "--json")...)), &sum))
	require.Equal(t, streamSummary{From: "golden-v1", To: "vm2-s1", Records: sum.Records, DataBytes: 1 << 20, ZeroBytes: 64 << 10}, sum)
	require.Contains(t, ok(t, "apply-diff", "--target", copyOfGolden, "-i", incr), "target is at vm2-s1")
	compare(t, copyOfGolden, uri("vm2-s1"))
	out, err = exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", copyOfGolden, uri("golden-v1")).CombinedOutput()
	require.Error(t, err, "the copy is no longer golden: %s", out)
	require.Contains(t, string(out), "Content mismatch at offset 2097152!")

	// Fill the store through vm3: qemu-io gets ENOSPC, not EIO.
	out, err = exec.Command("qemu-io", "-f", "raw", uri("vm3"), "-c", "write -P 0x33 0 32M").CombinedOutput()
	require.Error(t, err, "%s", out)
	require.Contains(t, string(out), "write failed: No space left on device")
	// serve warned when the free space crossed the low-water mark.
	d.waitStderr(t, "blocksnap serve: warning: store "+store+" is low on data space: ")
	// The connection open on vm1 carries on, and the store frees space:
	// once vm3 goes (forced: the failed qemu-io's connection may still be
	// closing on the server's side), writes succeed again.
	require.Contains(t, q.do(t, "read -P 0xa1 0 64k", "read"), "read 65536/65536 bytes")
	ok(t, pool("delete", "vm3", "--force")...)
	qemuIO(t, uri("vm2"), false, "write -P 0x22 0 4M", "flush", "read -P 0x22 0 4M")
	require.Contains(t, q.do(t, "write -P 0x11 0 1M", "wrote"), "wrote 1048576/1048576 bytes")
	require.Contains(t, q.do(t, "read -P 0x11 0 1M", "read"), "read 1048576/1048576 bytes")
	require.Contains(t, ok(t, pool("check")...), "is clean")
	q.in.Close()
	d.stop(t)
	require.Contains(t, ok(t, pool("check")...), "is clean")
}

// qemuImgInfo is `qemu-img info` of a raw export.
func qemuImgInfo(t *testing.T, uri string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-f", "raw", uri).CombinedOutput()
	require.NoError(t, err, "qemu-img info %s: %s", uri, out)
	return string(out)
}

// compare requires qemu-img compare to find the raw file and the export
// identical.
func compare(t *testing.T, file, uri string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", file, uri).CombinedOutput()
	require.NoError(t, err, "qemu-img compare %s %s: %s", file, uri, out)
	require.Contains(t, string(out), "Images are identical.")
}

// An origin write that needs a copy for a snapshot, on a full store, gets
// ENOSPC in qemu-io (the origin is not written, and the snapshot keeps its
// data); once a delete frees space the same write succeeds.
func TestServeOriginNoSpace(t *testing.T) {
	needTool(t, "qemu-io")
	f := newFixture(t) // 16 MiB origin and store
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }
	qemuIO(t, uri("origin"), false, "write -P 0xa1 0 1M", "flush")
	ok(t, f.args("snapshot", "s1")...)
	ok(t, f.args("clone", "filler", "--from", "s1")...)
	out, err := exec.Command("qemu-io", "-f", "raw", uri("filler"), "-c", "write -P 0x33 0 16M").CombinedOutput()
	require.Error(t, err, "%s", out)
	require.Contains(t, string(out), "write failed: No space left on device")

	out, err = exec.Command("qemu-io", "-f", "raw", uri("origin"), "-c", "write -P 0x44 0 64k").CombinedOutput()
	require.Error(t, err, "%s", out)
	require.Contains(t, string(out), "write failed: No space left on device")
	qemuIO(t, uri("origin"), true, "read -P 0xa1 0 1M")
	qemuIO(t, uri("s1"), true, "read -P 0xa1 0 1M")

	ok(t, f.args("delete", "filler", "--force")...) // forced: the failed qemu-io's connection may still be closing
	qemuIO(t, uri("origin"), false, "write -P 0x44 0 64k", "flush", "read -P 0x44 0 64k")
	qemuIO(t, uri("s1"), true, "read -P 0xa1 0 1M")
	d.stop(t)
	require.Contains(t, ok(t, f.args("check")...), "is clean")
}
