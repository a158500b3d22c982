package main

import (
	"encoding/json"
	"os"
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
}
