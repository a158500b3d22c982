package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"
)

// protect refuses deletes until unprotect; delete --recursive takes a
// snapshot's clones first; rollback resets a clone to a snapshot of its
// ancestor; usage shows metadata and, with --volumes, each volume.
func TestThinPoolCommands(t *testing.T) {
	f := newFixture(t)
	f.write(t, 0, 128<<10, 0xa1)
	ok(t, f.args("snapshot", "golden")...)
	ok(t, f.args("clone", "vm1", "--from", "golden")...)
	ok(t, f.args("snapshot", "vm1s", "--of", "vm1")...)
	ok(t, f.args("clone", "vm2", "--from", "vm1s")...)

	require.Contains(t, ok(t, f.args("protect", "golden")...), "golden is protected")
	var v control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("protect", "golden", "--json")...)), &v))
	require.True(t, v.Protected)
	fails(t, 1, `"golden" is protected (dependants: vm2, vm1s, vm1)`, f.args("delete", "golden")...)
	fails(t, 1, `"golden" is protected`, f.args("delete", "golden", "--recursive")...)
	require.Contains(t, ok(t, f.args("unprotect", "golden")...), "golden is unprotected")
	fails(t, 1, "no such volume", f.args("protect", "nope")...)

	// vm2 back to golden, two levels up.
	f.write(t, 0, 64<<10, 0xb2) // golden keeps the old data
	require.Contains(t, ok(t, f.args("rollback", "vm2", "--to", "golden")...), "rolled vm2 back to golden")
	require.Equal(t, f.image(t, "golden"), f.image(t, "vm2"))
	fails(t, 1, "vm1s is not a snapshot of vm1s", f.args("rollback", "vm1s", "--to", "vm1s")...)
	ok(t, f.args("snapshot", "vm2s", "--of", "vm2")...)
	fails(t, 1, "vm2s is not a snapshot of vm1 or of its ancestors", f.args("rollback", "vm1", "--to", "vm2s")...)

	out := ok(t, f.args("usage", "--volumes")...)
	require.Contains(t, out, "; metadata ")
	require.Regexp(t, `(?m)^  vm1 +clone +mapped `, out)
	var u struct {
		control.Space
		Volumes []control.VolumeStat `json:"volumes"`
	}
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("usage", "--volumes", "--json")...)), &u))
	require.Positive(t, u.MetadataRegion)
	require.Len(t, u.Volumes, 6)

	out = ok(t, f.args("delete", "golden", "--recursive")...)
	require.Contains(t, out, "deleted vm2s, vm2, vm1s, vm1 first")
	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	require.Len(t, vs, 1)
	require.Contains(t, ok(t, f.args("check")...), "is clean")
}

// grow extends the data region after the store file grew.
func TestGrowCommand(t *testing.T) {
	f := newFixture(t)
	var g control.GrowResult
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("grow", "--json")...)), &g))
	require.Zero(t, g.Added)
	before := g.DataBytes
	st, err := os.Stat(f.store)
	require.NoError(t, err)
	require.NoError(t, os.Truncate(f.store, st.Size()+8<<20))
	require.Contains(t, ok(t, f.args("grow")...), "(8MiB added)")
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("grow", "--json")...)), &g))
	require.Equal(t, before+8<<20, g.DataBytes)
	require.Zero(t, g.Added)
	require.Contains(t, ok(t, f.args("check")...), "is clean")

	// --metadata moves free data space into the metadata region.
	meta := g.MetadataBytes
	require.Positive(t, meta)
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("grow", "--metadata", "1M", "--json")...)), &g))
	require.Equal(t, int64(1<<20), g.MetadataAdded)
	require.Equal(t, meta+1<<20, g.MetadataBytes)
	require.Equal(t, before+8<<20-1<<20, g.DataBytes)
	require.Contains(t, ok(t, f.args("check")...), "is clean")
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("grow", "--json")...)), &g))
	require.Equal(t, meta+1<<20, g.MetadataBytes, "the grown region after a reopen")
}

// Against a running serve: protect refuses a delete; a recursive delete
// is refused while a client uses a dependant, then withdraws every
// dependant's export; a clone of a sparse origin maps its holes.
func TestServeProtectAndRecursiveDelete(t *testing.T) {
	needTool(t, "qemu-io")
	needTool(t, "nbdinfo")
	f := newFixture(t)
	f.write(t, 0, 64<<10, 0x5a) // one chunk of data; the rest of the file is a hole
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }
	ok(t, f.args("snapshot", "golden")...)
	ok(t, f.args("clone", "vm1", "--from", "golden")...)
	ok(t, f.args("snapshot", "vm1s", "--of", "vm1")...)
	ok(t, f.args("clone", "vm2", "--from", "vm1s")...)

	out, err := exec.Command("nbdinfo", "--map", uri("vm2")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Regexp(t, `(?m)^\s*0\s+65536\s+0\s+data$`, string(out))
	require.Regexp(t, `(?m)^\s*65536\s+16711680\s+3\s+hole,zero$`, string(out))

	ok(t, f.args("protect", "vm1s")...)
	fails(t, 1, `"vm1s", a dependant of "golden", is protected (dependants of "golden": vm2, vm1s, vm1)`, f.args("delete", "golden", "--recursive")...)
	ok(t, f.args("unprotect", "vm1s")...)

	q := startQemuIO(t, uri("vm2"))
	require.Contains(t, q.do(t, "write -P 0x3c 0 64k", "wrote"), "wrote 65536/65536 bytes")
	fails(t, 1, "vm2 has 1 connected NBD client(s)", f.args("delete", "golden", "--recursive")...)
	require.Contains(t, ok(t, f.args("delete", "golden", "--recursive", "--force")...), "deleted vm2, vm1s, vm1 first")
	require.Contains(t, q.do(t, "read 0 4k", "read failed"), "read failed: Input/output error")
	for _, name := range []string{"golden", "vm1", "vm1s", "vm2"} {
		out, _ := exec.Command("qemu-io", "-f", "raw", "-r", uri(name), "-c", "read 0 4k").CombinedOutput()
		require.Contains(t, string(out), "Requested export not available", "%s: %s", name, out)
	}
	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	require.Len(t, vs, 1)
	d.stop(t)
}
