package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
)

// poolArgs are a command's arguments on a store without an origin.
func poolArgs(store string, args ...string) []string { return append(args, "--store", store) }

// poolImage reads a whole volume of a store without an origin.
func poolImage(t *testing.T, store, name string) []byte {
	t.Helper()
	s, err := blockdev.Open(store, blockdev.FileOptions{ReadOnly: true})
	require.NoError(t, err)
	defer s.Close()
	st, err := snapshot.Open(nil, s, snapshot.Options{ReadOnly: true})
	require.NoError(t, err)
	defer st.Close()
	v, err := st.OpenVolume(name)
	require.NoError(t, err)
	p := make([]byte, v.Size())
	_, err = v.ReadAt(p, 0)
	require.NoError(t, err)
	return p
}

// format without --origin makes a pool; create, resize and import work on
// it, and list shows the volumes' kinds, sizes and UUIDs.
func TestPoolCommands(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "pool.img")
	out := ok(t, poolArgs(store, "format", "--size", "64MiB", "--chunk-size", "16KiB", "--max-volume-size", "1GiB")...)
	require.Contains(t, out, "without an origin, chunk size 16KiB, volumes up to 1GiB")

	out = ok(t, poolArgs(store, "create", "data1", "--size", "2MiB")...)
	require.Contains(t, out, "created volume data1 (2MiB, uuid ")
	fails(t, 2, "missing --size", poolArgs(store, "create", "x")...)
	fails(t, 1, "at most 1073741824", poolArgs(store, "create", "big", "--size", "2GiB")...)
	fails(t, 1, "name already in use", poolArgs(store, "create", "data1", "--size", "1MiB")...)

	img := filepath.Join(dir, "golden.raw")
	data := make([]byte, 4<<20)
	copy(data[1<<20:], bytes.Repeat([]byte{0x5a}, 100<<10))
	require.NoError(t, os.WriteFile(img, data, 0o644))
	out = ok(t, poolArgs(store, "import", "golden", img)...)
	require.Contains(t, out, "as volume golden (4MiB, uuid ")
	fails(t, 1, "missing.raw does not exist", poolArgs(store, "import", "g2", filepath.Join(dir, "missing.raw"))...)

	require.Contains(t, ok(t, poolArgs(store, "resize", "data1", "--size", "3MiB")...), "resized data1 to 3MiB")
	fails(t, 1, "would discard its tail", poolArgs(store, "resize", "data1", "--size", "1MiB")...)
	ok(t, poolArgs(store, "resize", "data1", "--size", "1MiB", "--shrink")...)
	ok(t, poolArgs(store, "snapshot", "golden@1", "--of", "golden")...)
	ok(t, poolArgs(store, "clone", "vm1", "--from", "golden@1")...)
	ok(t, poolArgs(store, "resize", "vm1", "--size", "8MiB")...)

	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, poolArgs(store, "list", "--json")...)), &vs))
	byName := map[string]control.Volume{}
	for _, v := range vs {
		require.NotEmpty(t, v.UUID)
		byName[v.Name] = v
	}
	require.Len(t, byName, 4, "no origin volume")
	require.Equal(t, "volume", byName["golden"].Kind)
	require.Equal(t, int64(1<<20), byName["data1"].Size)
	require.Equal(t, int64(8<<20), byName["vm1"].Size)
	require.Equal(t, int64(4<<20), byName["golden@1"].Size)
	table := ok(t, poolArgs(store, "list")...)
	require.Regexp(t, `(?m)^golden +volume +- +golden@1 +4MiB `, table)
	require.Contains(t, table, byName["vm1"].UUID[:8], "the table shows UUIDs")
	require.Contains(t, ok(t, poolArgs(store, "check")...), "is clean")

	require.Equal(t, data, poolImage(t, store, "golden"))
	vm1 := poolImage(t, store, "vm1")
	require.Equal(t, data, vm1[:4<<20])
	require.Equal(t, make([]byte, 4<<20), vm1[4<<20:])
	require.Equal(t, make([]byte, 1<<20), poolImage(t, store, "data1"))

	var u control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, poolArgs(store, "usage", "--json")...)), &u))
	require.Equal(t, int64(7*16<<10), u.UsedBytes, "the import stored only its 100KiB of data")
}

// Against a running serve on a pool: create and import export the new
// volume at once, and a resize shows in qemu-img info at the next
// connection.
func TestServePoolCreateImportResize(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	store := filepath.Join(dir, "pool.img")
	ok(t, poolArgs(store, "format", "--size", "64MiB")...)
	d := startDaemon(t, poolArgs(store, "serve", "--listen", "127.0.0.1:0", "--json")...)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }
	virtualSize := func(name string) int64 {
		t.Helper()
		out, err := exec.Command("qemu-img", "info", "--output=json", "-f", "raw", uri(name)).CombinedOutput()
		require.NoError(t, err, "%s", out)
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		require.NoError(t, json.Unmarshal(out, &info), "%s", out)
		return info.VirtualSize
	}

	ok(t, poolArgs(store, "create", "data1", "--size", "2GiB")...)
	require.Equal(t, int64(2<<30), virtualSize("data1"))
	img := filepath.Join(dir, "golden.raw")
	data := make([]byte, 8<<20)
	copy(data[3<<20:], bytes.Repeat([]byte{0x6b}, 64<<10))
	require.NoError(t, os.WriteFile(img, data, 0o644))
	ok(t, poolArgs(store, "import", "golden", img)...)
	got, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri("golden")).CombinedOutput()
	require.NoError(t, err, "%s", got)
	ok(t, poolArgs(store, "resize", "data1", "--size", "3GiB")...)
	require.Equal(t, int64(3<<30), virtualSize("data1"))

	// An NBD source: the serve reads its own export of golden.
	out := ok(t, poolArgs(store, "import", "golden2", uri("golden"))...)
	require.Contains(t, out, "as volume golden2 (8MiB")
	got, err = exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri("golden2")).CombinedOutput()
	require.NoError(t, err, "%s", got)
	var u control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, poolArgs(store, "usage", "--json")...)), &u))
	require.Equal(t, int64(2*64<<10), u.UsedBytes, "each import stored its one chunk of data")
}
