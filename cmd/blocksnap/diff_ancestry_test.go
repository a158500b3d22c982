package main

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

// writeVolume writes, zero-writes and discards on a clone of the store.
func (f fixture) writeVolume(t *testing.T, name string, fn func(v *snapshot.Volume)) {
	t.Helper()
	f.withStore(t, func(st *snapshot.Store) {
		v, err := st.OpenVolume(name)
		require.NoError(t, err)
		fn(v)
		require.NoError(t, v.Flush())
		require.NoError(t, v.Close())
	})
}

// A VM's backup as an incremental from its golden image: diff and
// export-diff take golden to a snapshot of a clone of a clone of it; the
// stream applied onto a restored golden gives the VM's snapshot byte for
// byte, zero-writes travel as zeros, and a target at another snapshot is
// refused with the way to force it.
func TestDiffAndExportAcrossClones(t *testing.T) {
	const chunk = 64 << 10
	f := newFixture(t)
	f.write(t, 0, 4*chunk, 0xa1)
	ok(t, f.args("snapshot", "golden")...)
	ok(t, f.args("clone", "vm1", "--from", "golden")...)
	f.writeVolume(t, "vm1", func(v *snapshot.Volume) {
		_, err := v.WriteAt(bytes.Repeat([]byte{0xb1}, chunk), 10*chunk)
		require.NoError(t, err)
		require.NoError(t, v.WriteZeroes(chunk, chunk)) // golden has data there
	})
	ok(t, f.args("snapshot", "vm1s", "--of", "vm1")...)
	ok(t, f.args("clone", "vm2", "--from", "vm1s")...)
	f.writeVolume(t, "vm2", func(v *snapshot.Volume) {
		_, err := v.WriteAt(bytes.Repeat([]byte{0xc1}, 4096), 20*chunk)
		require.NoError(t, err)
	})
	ok(t, f.args("snapshot", "vm2s", "--of", "vm2")...)

	var d control.Diff
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("diff", "golden", "vm2s", "--json")...)), &d))
	require.Equal(t, []control.Extent{
		{Off: chunk, Len: chunk, Zero: true}, {Off: 10 * chunk, Len: chunk}, {Off: 20 * chunk, Len: chunk},
	}, d.Extents)
	require.Contains(t, ok(t, f.args("diff", "vm1s", "vm2s")...), "1 extents, 64KiB changed from vm1s to vm2s")

	full, incr, other := filepath.Join(f.dir, "golden.bsd"), filepath.Join(f.dir, "vm2s.bsd"), filepath.Join(f.dir, "vm1s.bsd")
	ok(t, f.args("export-diff", "golden", "-o", full)...)
	var sum streamSummary
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("export-diff", "vm2s", "--from", "golden", "-o", incr, "--json")...)), &sum))
	// The zero-write is a ZERO record, and so is the rest of the chunk
	// vm2 wrote 4 KiB of (the origin reads zeros there).
	require.Equal(t, int64(2*chunk-4096), sum.ZeroBytes)
	require.Equal(t, int64(chunk+4096), sum.DataBytes)
	ok(t, f.args("export-diff", "vm1s", "--from", "golden", "-o", other)...)

	target := filepath.Join(f.dir, "vm.img")
	ok(t, "apply-diff", "--target", target, "-i", full)
	require.Equal(t, f.image(t, "golden"), readFile(t, target))
	require.Contains(t, ok(t, "apply-diff", "--target", target, "-i", incr), "target is at vm2s")
	require.Equal(t, f.image(t, "vm2s"), readFile(t, target))
	st, err := diffstream.ReadState(diffstream.DefaultStatePath(target))
	require.NoError(t, err)
	require.NotEmpty(t, st.At.UUID, "the state names the snapshot by UUID")
	fails(t, 1, "this stream applies onto golden", "apply-diff", "--target", target, "-i", other)
	fails(t, 1, "blocksnap apply-diff --force", "apply-diff", "--target", target, "-i", other)
	require.Equal(t, f.image(t, "vm2s"), readFile(t, target))

	// A blank volume's line shares no history with golden's.
	f.withStore(t, func(st *snapshot.Store) {
		v, err := st.CreateVolume("blank", 1<<20)
		require.NoError(t, err)
		require.NoError(t, v.Close())
	})
	ok(t, f.args("snapshot", "blank-s", "--of", "blank")...)
	fails(t, 1, "golden and blank-s share no history", f.args("diff", "golden", "blank-s")...)
	fails(t, 1, "share no history", f.args("export-diff", "blank-s", "--from", "golden", "-o", other)...)

	// And as a tool no one here wrote sees it: the golden copy with the
	// incremental applied equals a full export of the VM's snapshot.
	needTool(t, "qemu-img")
	whole, wholeStream := filepath.Join(f.dir, "vm2s.img"), filepath.Join(f.dir, "vm2s-full.bsd")
	ok(t, f.args("export-diff", "vm2s", "-o", wholeStream)...)
	ok(t, "apply-diff", "--target", whole, "-i", wholeStream)
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", target, whole).CombinedOutput()
	require.NoError(t, err, "qemu-img compare: %s", out)
	require.Contains(t, string(out), "Images are identical")
}
