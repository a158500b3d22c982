package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
)

// qemuSession is an interactive qemu-io holding one NBD connection open.
type qemuSession struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

func startQemuIO(t *testing.T, uri string) *qemuSession {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", uri)
	in, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = cmd.Stdout
	require.NoError(t, cmd.Start())
	q := &qemuSession{cmd: cmd, in: in, lines: make(chan string, 64)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			q.lines <- sc.Text()
		}
		close(q.lines)
	}()
	t.Cleanup(func() {
		in.Close()
		_ = cmd.Wait()
	})
	return q
}

// do sends one qemu-io command and returns the output lines up to the
// first one holding any of want (or all of them, if qemu-io exits first).
func (q *qemuSession) do(t *testing.T, command string, want ...string) string {
	t.Helper()
	_, err := io.WriteString(q.in, command+"\n")
	require.NoError(t, err)
	var got []string
	deadline := time.After(time.Minute) // a guard against a hang, not a timing assertion
	for {
		select {
		case l, open := <-q.lines:
			if !open {
				return strings.Join(got, "\n")
			}
			got = append(got, l)
			for _, w := range want {
				if strings.Contains(l, w) {
					return strings.Join(got, "\n")
				}
			}
		case <-deadline:
			t.Fatalf("qemu-io did not answer %q with %q within a minute: %q", command, want, got)
		}
	}
}

// Against a running serve: list shows the hidden snapshots that clones
// hang from, with every volume's children; deleting a volume a real NBD
// client (qemu-io) is connected to is refused until --force, which closes
// its connection.
func TestServeListHiddenAndDeleteInUse(t *testing.T) {
	needTool(t, "qemu-io")
	f := newFixture(t)
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	uri := func(name string) string { return fmt.Sprintf("nbd://%s/%s", d.info.Listen, name) }

	ok(t, f.args("clone", "live", "--from", "origin")...) // through an implicit hidden snapshot
	ok(t, f.args("snapshot", "gold")...)
	ok(t, f.args("clone", "vm", "--from", "gold")...)
	fails(t, 1, `"gold" has dependants: vm`, f.args("delete", "gold")...)
	ok(t, f.args("delete", "gold", "--detach")...) // vm keeps it, hidden

	var vs []control.Volume
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	byName, byID := map[string]control.Volume{}, map[uint64]control.Volume{}
	for _, v := range vs {
		byName[v.Name] = v
		byID[v.ID] = v
	}
	require.Len(t, vs, 5, "origin, live, vm and two hidden snapshots: %+v", vs)
	for _, clone := range []string{"live", "vm"} {
		p := byID[byName[clone].ParentID]
		require.True(t, p.Hidden, "%s hangs from a hidden snapshot: %+v", clone, p)
		require.Empty(t, p.Name)
		require.Equal(t, []uint64{byName[clone].ID}, p.Children)
		require.Equal(t, byName["origin"].ID, p.ParentID)
		require.Contains(t, byName["origin"].Children, p.ID)
	}
	table := ok(t, f.args("list")...)
	var rows []string // each row with its columns one space apart
	for _, l := range strings.Split(strings.TrimSpace(table), "\n") {
		rows = append(rows, strings.Join(strings.Fields(l), " "))
	}
	hl, hv := byName["live"].ParentID, byName["vm"].ParentID
	require.Equal(t, "NAME KIND PARENT CHILDREN SIZE CREATED UUID", rows[0])
	for i, want := range []string{
		fmt.Sprintf("origin origin - (hidden #%d),(hidden #%d) 16MiB", hl, hv),
		fmt.Sprintf("(hidden #%d) snapshot origin live 16MiB", hl),
		fmt.Sprintf("live clone (hidden #%d) - 16MiB", hl),
		fmt.Sprintf("(hidden #%d) snapshot origin vm 16MiB", hv),
		fmt.Sprintf("vm clone (hidden #%d) - 16MiB", hv),
	} {
		require.True(t, strings.HasPrefix(rows[i+1], want+" "), "row %d: %q, want %q", i+1, rows[i+1], want)
	}

	// A restarted serve exports every visible volume (hidden ones have no
	// name to export).
	d.stop(t)
	d = startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	require.Equal(t, []string{"live", "origin", "vm"}, d.info.Exports)

	q := startQemuIO(t, uri("vm"))
	require.Contains(t, q.do(t, "write -P 0x3c 0 64k", "wrote"), "wrote 65536/65536 bytes")
	fails(t, 1, "volume is in use: vm has 1 connected NBD client(s); delete --force closes their connections", f.args("delete", "vm")...)
	require.Contains(t, q.do(t, "read -P 0x3c 0 64k", "read"), "read 65536/65536 bytes", "the refused delete left the client alone")
	require.Contains(t, ok(t, f.args("delete", "vm", "--force")...), "deleted vm")
	out := q.do(t, "read 0 4k", "read failed")
	require.Contains(t, out, "read failed: Input/output error", "the forced delete closed the connection")

	// With no client, a plain delete works; the hidden snapshot went with
	// vm, its last clone.
	ok(t, f.args("delete", "live")...)
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("list", "--json")...)), &vs))
	require.Len(t, vs, 1, "%+v", vs)
	d.stop(t)
}

// An origin locked by another process (here: this test) is refused with
// the holder's pid; a store held by a program embedding the library is
// refused like one held by serve, with no control socket to go through.
func TestOriginAndStoreLockedByOthers(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the holder's pid comes from /proc/locks (Linux)")
	}
	f := newFixture(t)
	l, err := lockFile(f.origin)
	require.NoError(t, err)
	fails(t, 1, fmt.Sprintf("origin %s is in use by another process (held by pid %d)", f.origin, os.Getpid()),
		f.args("snapshot", "x")...)
	require.NoError(t, l.Close())

	f.withStore(t, func(*snapshot.Store) {
		fails(t, 1, fmt.Sprintf("store %s is in use by another process, and no control socket answers at %s.control (held by pid %d)", f.store, f.store, os.Getpid()),
			f.args("list")...)
	})
	ok(t, f.args("snapshot", "x")...)
}

// A bad volume name is refused by the library, locally and through a
// running serve alike, with the rule it breaks.
func TestBadVolumeNames(t *testing.T) {
	f := newFixture(t)
	ok(t, f.args("snapshot", "s1")...)
	try := func() {
		fails(t, 1, `bad volume name "a/b": holds a slash`, f.args("snapshot", "a/b")...)
		fails(t, 1, `bad volume name "vm/1": holds a slash`, f.args("clone", "vm/1", "--from", "s1")...)
		fails(t, 1, `bad volume name "x/y": holds a slash`, f.args("rename", "s1", "x/y")...)
	}
	try()
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--json")...)
	try()
	d.stop(t)
}
