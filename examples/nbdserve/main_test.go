package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/nbd"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "64MiB": 64 << 20, "64M": 64 << 20, "64m": 64 << 20, "1GiB": 1 << 30,
		"2G": 2 << 30, "1MB": 1e6, "512B": 512, "8 KiB": 8 << 10,
	} {
		got, err := parseSize(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "MiB", "-1M", "0", "1.5G", "12X", "99999999999T"} {
		_, err := parseSize(bad)
		require.Error(t, err, bad)
	}
}

// serve runs the program until the test cancels it, and returns the URI
// it printed.
func serve(t *testing.T, args ...string) (string, context.CancelFunc, chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := run(ctx, args, pw, io.Discard)
		pw.Close()
		done <- err
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go io.Copy(io.Discard, pr)
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return strings.TrimSpace(line), cancel, done
}

func TestServeMem(t *testing.T) {
	uri, cancel, done := serve(t, "-listen", "127.0.0.1:0", "-mem", "4MiB", "-name", "scratch")
	require.True(t, strings.HasPrefix(uri, "nbd://127.0.0.1:"), uri)
	require.True(t, strings.HasSuffix(uri, "/scratch"), uri)
	c, err := nbd.Dial(context.Background(), uri)
	require.NoError(t, err)
	require.Equal(t, int64(4<<20), c.Size())
	p := bytes.Repeat([]byte{0xab}, 4096)
	_, err = c.WriteAt(p, 0)
	require.NoError(t, err)
	require.NoError(t, c.Close())

	// The empty name (nbd://host:port) selects the export too.
	c, err = nbd.Dial(context.Background(), strings.TrimSuffix(uri, "/scratch"))
	require.NoError(t, err)
	got := make([]byte, 4096)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, p, got)
	require.NoError(t, c.Close())

	cancel() // as SIGINT does
	require.NoError(t, <-done)
	done <- nil // for the cleanup
}

func TestServeFileReadOnlySocket(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	require.NoError(t, writeFile(img, 1<<20))
	sock := filepath.Join(dir, "nbd.sock")
	uri, _, _ := serve(t, "-socket", sock, "-file", img, "-readonly")
	require.True(t, strings.HasPrefix(uri, "nbd+unix:///default?socket="), uri)
	c, err := nbd.Dial(context.Background(), uri)
	require.NoError(t, err)
	defer c.Close()
	require.True(t, c.Info().ReadOnly)
	require.Equal(t, int64(1<<20), c.Size())
	got := make([]byte, 4096)
	_, err = c.ReadAt(got, 4096)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{7}, 4096), got)
}

func TestServeBadArgs(t *testing.T) {
	for _, args := range [][]string{
		{}, {"-mem", "1M", "-file", "x"}, {"-mem", "lots"}, {"-mem", "1M", "-listen", "a:1", "-socket", "b"},
		{"-file", "/nonexistent/disk.img"},
	} {
		require.Error(t, run(context.Background(), args, io.Discard, io.Discard), "%q", args)
	}
}

func writeFile(path string, size int) error {
	return os.WriteFile(path, bytes.Repeat([]byte{7}, size), 0o644)
}
