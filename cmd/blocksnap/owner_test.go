package main

import (
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// A store held through views that take no flock (as a process on another
// host sharing the device holds it) refuses a command that changes it,
// naming the holder from the owner record; an inspecting command opens
// beside it; --take-over opens it anyway.
func TestOwnerRecordRefusesCommand(t *testing.T) {
	f := newFixture(t)
	var views [2]blockdev.Device
	for i, p := range []string{f.origin, f.store} {
		d, err := blockdev.Open(p, blockdev.FileOptions{})
		require.NoError(t, err)
		t.Cleanup(func() { _ = d.Close() })
		views[i], err = blockdev.Slice(d, 0, d.Size())
		require.NoError(t, err)
	}
	st, err := snapshot.Open(views[0], views[1], snapshot.Options{})
	require.NoError(t, err)
	defer st.Close() // taken over below: what it writes then no longer matters

	fails(t, 1, fmt.Sprintf("is held by pid %d on host", os.Getpid()), f.args("snapshot", "s1")...)
	fails(t, 1, "add --take-over only once that process is known to be gone", f.args("snapshot", "s1")...)
	ok(t, f.args("list")...)
	ok(t, f.args("snapshot", "s1", "--take-over")...)
	require.Contains(t, ok(t, f.args("list")...), "s1")
}
