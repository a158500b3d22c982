package main

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestCloneDemoSource(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), &out, t.TempDir(), ""))
	t.Log("\n" + out.String())
	s := out.String()
	require.Contains(t, s, "source nbd://127.0.0.1:")
	require.Contains(t, s, "hydrated 512 regions of 64 KiB")
	require.Contains(t, s, "verified: dest.img equals the source")
	require.Contains(t, s, "%", "the progress callback ran")
}

// With nbdkit as the source, as the README shows.
func TestCloneFromNbdkit(t *testing.T) {
	if _, err := exec.LookPath("nbdkit"); err != nil {
		t.Skip("nbdkit is not installed (apt-get install -y nbdkit); skipping")
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sock := dir + "/nbdkit.sock"
	cmd := exec.CommandContext(ctx, "nbdkit", "-f", "-r", "-U", sock, "pattern", "size=8M")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	uri := "nbd+unix:///?socket=" + sock
	var out bytes.Buffer
	// nbdkit creates the socket after it starts; retry the dial briefly.
	var err error
	for range 100 {
		out.Reset()
		if err = run(ctx, &out, t.TempDir(), uri); err == nil || !strings.Contains(err.Error(), "connect") {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait() // stderr is complete once Wait returns
		t.Fatalf("hydrating from nbdkit: %v; nbdkit said: %s", err, stderr.String())
	}
	require.Contains(t, out.String(), "hydrated 128 regions of 64 KiB")
}
