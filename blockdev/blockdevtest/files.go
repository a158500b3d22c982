package blockdevtest

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// CreateFile makes a sparse file of size bytes at path and opens it
// read-write; it is closed at the end of the test.
func CreateFile(t testing.TB, path string, size int64) *blockdev.File {
	t.Helper()
	f, err := blockdev.Create(path, size, blockdev.FileOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// OpenFile opens the file at path, read-only if ro, on a handle of its own
// (its own flock); it is closed at the end of the test.
func OpenFile(t testing.TB, path string, ro bool) *blockdev.File {
	t.Helper()
	f, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: ro})
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// StartChild runs the test named test of this test binary in a child
// process, with env (KEY=VALUE) added to its environment, and waits until
// it calls ChildReady. It returns the child's pid and a function that
// tells the child to finish (closing its stdin) and requires a clean exit.
// Tests use it to hold a lock in another process.
func StartChild(t testing.TB, test string, env ...string) (pid int, finish func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), env...)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "the child %s did not get ready", test)
	require.Equal(t, childReady+"\n", line)
	return cmd.Process.Pid, func() {
		t.Helper()
		require.NoError(t, stdin.Close())
		require.NoError(t, cmd.Wait()) // what else the child printed is not read

	}
}

const childReady = "blockdevtest: child ready"

// ChildReady, called by the test StartChild runs, tells the parent the
// child is ready and returns when the parent calls finish.
func ChildReady() {
	os.Stdout.WriteString(childReady + "\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
}
