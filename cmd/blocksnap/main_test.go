package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// binary is the blocksnap command built once for the package's tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blocksnap-cmd-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "blocksnap")
	args := []string{"build", "-o", binary}
	if os.Getenv("BLOCKSNAP_CMD_RACE") != "" {
		// The binary under test built with the race detector: its
		// concurrent parts (serve, the control socket) run checked.
		args = append(args, "-race")
	}
	out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is what a run of the binary did.
type result struct {
	stdout, stderr string
	code           int
}

// bs runs the binary with args (and stdin, if given).
func bs(t *testing.T, stdin io.Reader, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return result{out.String(), errb.String(), code}
}

// ok runs the binary and requires exit status 0.
func ok(t *testing.T, args ...string) string {
	t.Helper()
	r := bs(t, nil, args...)
	require.Equal(t, 0, r.code, "blocksnap %s: stderr %q", strings.Join(args, " "), r.stderr)
	return r.stdout
}

// fails runs the binary and requires the exit status and a one-line error
// on stderr containing msg.
func fails(t *testing.T, code int, msg string, args ...string) {
	t.Helper()
	r := bs(t, nil, args...)
	require.Equal(t, code, r.code, "blocksnap %s: stdout %q stderr %q", strings.Join(args, " "), r.stdout, r.stderr)
	require.Contains(t, r.stderr, msg, "blocksnap %s", strings.Join(args, " "))
	require.Equal(t, 1, strings.Count(r.stderr, "\n"), "one line on stderr: %q", r.stderr)
	require.True(t, strings.HasPrefix(r.stderr, "blocksnap"), "stderr %q", r.stderr)
	for _, pkg := range []string{"snapshot", "clone", "exception", "journal", "blockdev", "diffstream", "nbd", "control"} {
		require.NotContains(t, r.stderr, ": "+pkg+": ", "a library prefix leaked into the message")
	}
	require.NotContains(t, r.stderr, "bad options")
}

// fixture is a formatted store in a temporary directory.
type fixture struct {
	dir, origin, store string
}

func (f fixture) flags() []string { return []string{"--origin", f.origin, "--store", f.store} }

func (f fixture) args(args ...string) []string { return append(args, f.flags()...) }

func newFixture(t *testing.T) fixture {
	t.Helper()
	dir := t.TempDir()
	f := fixture{dir: dir, origin: filepath.Join(dir, "origin.img"), store: filepath.Join(dir, "store.img")}
	out := ok(t, f.args("format", "--size", "16MiB", "--chunk-size", "64KiB")...)
	require.Contains(t, out, "formatted store")
	return f
}

// withStore opens the store in this process (the command must not be
// holding it) and runs fn.
func (f fixture) withStore(t *testing.T, fn func(st *snapshot.Store)) {
	t.Helper()
	o, err := blockdev.Open(f.origin, blockdev.FileOptions{})
	require.NoError(t, err)
	defer o.Close()
	s, err := blockdev.Open(f.store, blockdev.FileOptions{})
	require.NoError(t, err)
	defer s.Close()
	st, err := snapshot.Open(o, s, snapshot.Options{})
	require.NoError(t, err)
	fn(st)
	require.NoError(t, st.Close())
}

// write writes a pattern through the store's origin.
func (f fixture) write(t *testing.T, off int64, n int, b byte) {
	t.Helper()
	f.withStore(t, func(st *snapshot.Store) {
		v := st.Origin()
		_, err := v.WriteAt(bytes.Repeat([]byte{b}, n), off)
		require.NoError(t, err)
		require.NoError(t, v.Flush())
		require.NoError(t, v.Close())
	})
}

// image reads a whole volume of the store.
func (f fixture) image(t *testing.T, name string) []byte {
	t.Helper()
	var p []byte
	f.withStore(t, func(st *snapshot.Store) {
		v, err := st.OpenVolume(name)
		require.NoError(t, err)
		p = make([]byte, v.Size())
		_, err = v.ReadAt(p, 0)
		require.NoError(t, err)
		require.NoError(t, v.Close())
	})
	return p
}

func TestUsageAndHelp(t *testing.T) {
	r := bs(t, nil)
	require.Equal(t, 2, r.code)
	require.Contains(t, r.stderr, "Usage: blocksnap COMMAND")
	r = bs(t, nil, "--help")
	require.Equal(t, 0, r.code)
	for _, c := range commands {
		require.Contains(t, r.stdout, "  "+c.name+" ")
		out := ok(t, c.name, "--help")
		require.Contains(t, out, "Usage: blocksnap "+c.name, c.name)
		require.Contains(t, out, "Flags:", c.name)
	}
	fails(t, 2, `unknown command "frobnicate"`, "frobnicate")
	fails(t, 2, "unknown flag: --bogus", "list", "--bogus")
}

func TestBadUsage(t *testing.T) {
	f := newFixture(t)
	for _, c := range []string{"snapshot x", "clone x --from s", "list", "delete x", "rollback x --to s", "stat x", "dump", "diff a", "export-diff s", "serve", "format"} {
		fails(t, 2, "missing --store", strings.Fields(c)...)
		fails(t, 2, "missing --store", append(strings.Fields(c), "--origin", f.origin)...)
	}
	fails(t, 2, "give --store (and --origin, if the store has one), or --source, --dest and --meta, or --cow", "check")
	fails(t, 2, "give --store", "check", "--origin", f.origin)
	fails(t, 2, "missing NAME", f.args("snapshot")...)
	fails(t, 2, "unexpected arguments", f.args("snapshot", "a", "b")...)
	fails(t, 2, "missing --from", f.args("clone", "c")...)
	fails(t, 2, "missing VOLUME", f.args("rollback", "--to", "s")...)
	fails(t, 2, "missing --to", f.args("rollback", "origin")...)
	fails(t, 2, "missing FROM", f.args("diff")...)
	fails(t, 2, "unexpected arguments", f.args("diff", "a", "b", "c")...)
	fails(t, 2, "missing TO", f.args("export-diff")...)
	fails(t, 2, "missing --target", "apply-diff")
	fails(t, 2, "missing --source and --dest and --meta", "hydrate")
	fails(t, 2, "missing --meta", "status", "--source", "a", "--dest", "b")
	fails(t, 2, `bad size "12X"`, f.args("format", "--size", "12X")...)
	fails(t, 2, "nothing to listen on", f.args("serve", "--listen", "")...)
}

func TestStoreCommands(t *testing.T) {
	f := newFixture(t)
	fails(t, 1, "already holds a blocksnap store", f.args("format")...)
	f.write(t, 0, 256<<10, 0xa1)

	require.Contains(t, ok(t, f.args("snapshot", "s1")...), "created snapshot s1 of origin")
	f.write(t, 128<<10, 64<<10, 0xb2)
	out := ok(t, f.args("clone", "c1", "--from", "s1", "--json")...)
	var v control.Volume
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	require.Equal(t, "c1", v.Name)
	require.Equal(t, "clone", v.Kind)
	require.Equal(t, "s1", v.Parent)
	ok(t, f.args("snapshot", "c1snap", "--of", "c1")...)

	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	var names []string
	for _, v := range vs {
		names = append(names, v.Name+":"+v.Kind)
	}
	require.Equal(t, []string{"origin:origin", "s1:snapshot", "c1:clone", "c1snap:snapshot"}, names)
	require.Contains(t, ok(t, f.args("list")...), "c1snap  snapshot  c1")

	var st control.VolumeStat
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("stat", "s1", "--json")...)), &st))
	require.Equal(t, int64(64<<10), st.Mapped, "s1 holds the one chunk the origin overwrote")
	require.Contains(t, ok(t, f.args("stat", "origin")...), "origin (origin): size 16MiB")

	var d control.Diff
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("diff", "s1", "--json")...)), &d))
	require.Equal(t, control.Diff{From: "s1", To: "origin", Extents: []control.Extent{{Off: 128 << 10, Len: 64 << 10}}, Bytes: 64 << 10}, d)
	require.Contains(t, ok(t, f.args("diff", "s1", "origin")...), "1 extents, 64KiB changed from s1 to origin")

	require.Contains(t, ok(t, f.args("rollback", "origin", "--to", "s1")...), "rolled origin back to s1")
	require.Equal(t, f.image(t, "s1"), f.image(t, "origin"))

	require.Contains(t, ok(t, f.args("delete", "c1snap")...), "deleted c1snap; reclaimed")
	require.Contains(t, ok(t, f.args("delete", "c1", "--no-wait")...), "reclaimed in the background")

	var rep control.CheckReport
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("check", "--json")...)), &rep))
	require.True(t, rep.OK)
	require.Contains(t, ok(t, f.args("check")...), "is clean (2 volumes)")

	var dump control.Dump
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("dump")...)), &dump))
	require.Equal(t, int64(16<<20), dump.OriginSize)
	require.Len(t, dump.Volumes, 2)
	require.True(t, dump.Check.OK)
	require.Equal(t, int64(64<<10), dump.Space.ChunkSize)
	require.Equal(t, "s1", dump.Volumes[1].Name)
	require.Equal(t, "origin", dump.Volumes[1].Against)
	require.Equal(t, []control.Extent{{Off: 128 << 10, Len: 64 << 10}}, dump.Volumes[1].Extents, "s1 differs from the origin where the origin was overwritten")

	var sp control.Space
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("usage", "--json")...)), &sp))
	require.Equal(t, dump.Space, sp)
	require.Contains(t, ok(t, f.args("usage")...), "store "+f.store+": data 64KiB used of ")
	require.Contains(t, ok(t, f.args("usage")...), "; space maps ", "the space maps' memory")

	// rename, locally; the old name is gone, the new one is the volume.
	require.Contains(t, ok(t, f.args("rename", "s1", "monday")...), "renamed s1 to monday")
	fails(t, 1, `no such volume: "s1"`, f.args("stat", "s1")...)
	require.Contains(t, ok(t, f.args("stat", "monday")...), "monday (snapshot)")
	fails(t, 1, "name already in use", f.args("rename", "monday", "origin")...)
	fails(t, 2, "missing NEWNAME", f.args("rename", "monday")...)
	ok(t, f.args("rename", "monday", "s1")...)

	// Wrong names.
	fails(t, 1, `no such volume: "nope"`, f.args("snapshot", "x", "--of", "nope")...)
	fails(t, 1, `no such volume: "nope"`, f.args("delete", "nope")...)
	fails(t, 1, `no such volume: "nope"`, f.args("stat", "nope")...)
	fails(t, 1, `no such volume: "nope"`, f.args("clone", "x", "--from", "nope")...)
	fails(t, 1, `no such volume: "nope"`, f.args("diff", "nope")...)
	fails(t, 1, "name already in use", f.args("snapshot", "s1")...)
	fails(t, 1, "TO origin is a origin, not a snapshot", f.args("export-diff", "origin", "-o", filepath.Join(f.dir, "x"))...)
}

func TestNotAStoreAndLockedStore(t *testing.T) {
	dir := t.TempDir()
	origin, store := filepath.Join(dir, "o"), filepath.Join(dir, "s")
	require.NoError(t, os.WriteFile(origin, make([]byte, 1<<20), 0o644))
	require.NoError(t, os.WriteFile(store, bytes.Repeat([]byte("garbage!"), 1<<17), 0o644))
	flags := []string{"--origin", origin, "--store", store}
	for _, c := range []string{"list", "check", "dump", "snapshot x", "diff a"} {
		fails(t, 1, store+" is not a blocksnap store", append(strings.Fields(c), flags...)...)
	}
	fails(t, 1, "does not exist (create it with blocksnap format --size)", "list", "--origin", origin, "--store", filepath.Join(dir, "missing"))
	fails(t, 1, "does not exist (give --size to create it)", "format", "--origin", origin, "--store", filepath.Join(dir, "missing"))

	f := newFixture(t)
	l, err := lockFile(f.store)
	require.NoError(t, err)
	for _, c := range []string{"list", "check", "dump", "snapshot x", "format --force", "rollback origin --to x", "export-diff x"} {
		fails(t, 1, "is in use by another process, and no control socket answers at "+f.store+".control", f.args(strings.Fields(c)...)...)
	}
	l.Close()
	ok(t, f.args("check")...)
}
