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

// The VM manager's flow against `blocksnap serve`, with real clients only
// (qemu-io, qemu-img, nbdinfo): a sparse golden image, its snapshot, three
// clones; each clone maps holes where the golden image has them; a clone
// is written, then reset to golden while a qemu-io stays connected, and
// that client reads golden's bytes; a clone's snapshot is backed up as an
// incremental from golden, applied onto a copy of golden and compared
// with qemu-img; the store is filled through a
// clone, serve warns at the low-water mark, qemu-io gets ENOSPC, and after
// a delete the store takes writes again.
func TestVMManagerFlow(t *testing.T) {
	for _, tool := range []string{"qemu-io", "qemu-img", "nbdinfo"} {
		needTool(t, tool)
	}
	f := newFixture(t) // 16 MiB origin and store, 64 KiB chunks
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }

	// The golden image: data at 0 (1 MiB) and 8 MiB (512 KiB), holes
	// elsewhere.
	qemuIO(t, uri("origin"), false, "write -P 0xa1 0 1M", "write -P 0xa2 8M 512k", "flush")
	golden := []string{"0 1048576 data", "1048576 7340032 hole,zero", "8388608 524288 data", "8912896 7864320 hole,zero"}
	require.Equal(t, golden, nbdMap(t, uri("origin")))
	ok(t, f.args("snapshot", "golden-v1")...)
	require.Equal(t, golden, nbdMap(t, uri("golden-v1")))
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		ok(t, f.args("clone", vm, "--from", "golden-v1")...)
		require.Equal(t, golden, nbdMap(t, uri(vm)), "%s maps holes where golden has them", vm)
	}
	info, err := exec.Command("qemu-img", "info", "-f", "raw", uri("vm2")).CombinedOutput()
	require.NoError(t, err, "%s", info)
	require.Contains(t, string(info), "virtual size: 16 MiB (16777216 bytes)")

	// vm1 is written (over data and into a hole), then reset to golden
	// while this qemu-io stays connected: its next reads see golden.
	q := startQemuIO(t, uri("vm1"))
	require.Contains(t, q.do(t, "write -P 0xee 0 64k", "wrote"), "wrote 65536/65536 bytes")
	require.Contains(t, q.do(t, "write -P 0xef 4M 64k", "wrote"), "wrote 65536/65536 bytes")
	require.Contains(t, q.do(t, "read -P 0xef 4M 64k", "read"), "read 65536/65536 bytes")
	require.NotEqual(t, golden, nbdMap(t, uri("vm1")))
	require.Contains(t, ok(t, f.args("rollback", "vm1", "--to", "golden-v1")...), "rolled vm1 back to golden-v1")
	for _, c := range []string{"read -P 0xa1 0 1M", "read -P 0 4M 64k", "read -P 0xa2 8M 512k"} {
		out := q.do(t, c, "read ", "failed")
		require.NotContains(t, out, "failed", "%s after the reset, on the connection open across it", c)
		require.Contains(t, out, "read ", "%s after the reset", c)
	}
	require.Equal(t, golden, nbdMap(t, uri("vm1")), "the reset to the clone's base is metadata: the holes are back")

	// A backup of vm2 as an incremental from golden: golden-v1 exported
	// in full and applied makes a copy of golden; the diff from golden-v1
	// to a snapshot of vm2, exported through serve and applied onto that
	// copy, gives the snapshot, byte for byte (qemu-img compare reads the
	// file and the snapshot's export). The stream carries only what vm2
	// changed.
	qemuIO(t, uri("vm2"), false, "write -P 0x22 2M 1M", "write -z 8M 64k", "flush")
	ok(t, f.args("snapshot", "vm2-s1", "--of", "vm2")...)
	require.Contains(t, ok(t, f.args("diff", "golden-v1", "vm2-s1")...), "2 extents, 1.062MiB changed from golden-v1 to vm2-s1")
	full, incr := filepath.Join(f.dir, "golden-v1.bsd"), filepath.Join(f.dir, "vm2-s1.bsd")
	copyOfGolden := filepath.Join(f.dir, "vm2.img")
	ok(t, f.args("export-diff", "golden-v1", "-o", full)...)
	ok(t, "apply-diff", "--target", copyOfGolden, "-i", full)
	compare(t, copyOfGolden, uri("golden-v1"))
	var sum streamSummary
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("export-diff", "vm2-s1", "--from", "golden-v1", "-o", incr, "--json")...)), &sum))
	require.Equal(t, streamSummary{From: "golden-v1", To: "vm2-s1", Records: sum.Records, DataBytes: 1 << 20, ZeroBytes: 64 << 10}, sum)
	require.Contains(t, ok(t, "apply-diff", "--target", copyOfGolden, "-i", incr), "target is at vm2-s1")
	compare(t, copyOfGolden, uri("vm2-s1"))
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", copyOfGolden, uri("golden-v1")).CombinedOutput()
	require.Error(t, err, "the copy is no longer golden: %s", out)
	require.Contains(t, string(out), "Content mismatch at offset 2097152!")

	// Fill the store through vm3: qemu-io gets ENOSPC, not EIO.
	out, err = exec.Command("qemu-io", "-f", "raw", uri("vm3"), "-c", "write -P 0x33 0 16M").CombinedOutput()
	require.Error(t, err, "%s", out)
	require.Contains(t, string(out), "write failed: No space left on device")
	// serve warned when the free space crossed the low-water mark.
	d.waitStderr(t, "blocksnap serve: warning: store "+f.store+" is low on data space: ")
	// So does an origin write that needs a copy for golden-v1.
	out, err = exec.Command("qemu-io", "-f", "raw", uri("origin"), "-c", "write -P 0x44 0 64k").CombinedOutput()
	require.Error(t, err, "%s", out)
	require.Contains(t, string(out), "write failed: No space left on device")
	qemuIO(t, uri("golden-v1"), true, "read -P 0xa1 0 1M")
	// The connection open on vm1 carries on, and the store frees space:
	// once vm3 goes (forced: the failed qemu-io's connection may still be
	// closing on the server's side), writes succeed again.
	require.Contains(t, q.do(t, "read -P 0xa1 0 64k", "read"), "read 65536/65536 bytes")
	ok(t, f.args("delete", "vm3", "--force")...)
	qemuIO(t, uri("vm2"), false, "write -P 0x22 0 4M", "flush", "read -P 0x22 0 4M")
	qemuIO(t, uri("origin"), false, "write -P 0x44 0 64k", "flush", "read -P 0x44 0 64k")
	qemuIO(t, uri("golden-v1"), true, "read -P 0xa1 0 1M")
	require.Contains(t, q.do(t, "write -P 0x11 0 1M", "wrote"), "wrote 1048576/1048576 bytes")
	require.Contains(t, q.do(t, "read -P 0x11 0 1M", "read"), "read 1048576/1048576 bytes")
	require.Contains(t, ok(t, f.args("check")...), "is clean")
	q.in.Close()
	d.stop(t)
	require.Contains(t, ok(t, f.args("check")...), "is clean")
}

// compare requires qemu-img compare to find the raw file and the export
// identical.
func compare(t *testing.T, file, uri string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", file, uri).CombinedOutput()
	require.NoError(t, err, "qemu-img compare %s %s: %s", file, uri, out)
	require.Contains(t, string(out), "Images are identical.")
}
