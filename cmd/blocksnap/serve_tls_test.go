package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/nbd"
)

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:10809": true, "127.1.2.3:0": true, "[::1]:0": true, "localhost:0": true, "LocalHost:1": true,
		"[::ffff:127.0.0.1]:0": true, "[::1%lo]:0": true,
		"0.0.0.0:10809": false, "[::]:0": false, ":10809": false, "192.168.1.5:0": false, "[fe80::1]:0": false,
		"example.com:10809": false, "[::ffff:10.0.0.1]:0": false,
	} {
		require.Equal(t, want, isLoopback(addr), addr)
	}
}

// Without TLS, serve and hydrate --serve refuse a TCP address other than
// loopback (a usage error, exit 2) unless --allow-plaintext is given;
// loopback and a Unix socket alone need nothing.
func TestServePlaintextOnlyOnLoopback(t *testing.T) {
	f := newFixture(t)
	const why = "which is not a loopback address: anyone who can reach the port can read and overwrite every writable export; " +
		"give --tls require --tls-creds DIR, or --allow-plaintext"
	for _, addr := range []string{"0.0.0.0:0", "[::]:0", ":0", "192.0.2.1:10809"} {
		fails(t, 2, "refusing to serve NBD without TLS on "+addr+" (--listen), "+why, f.args("serve", "--listen", addr)...)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, make([]byte, 1<<20), 0o644))
	hflags := []string{"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", filepath.Join(dir, "meta")}
	fails(t, 2, "refusing to serve NBD without TLS on 0.0.0.0:0 (--serve), "+why, append([]string{"hydrate", "--serve", "0.0.0.0:0"}, hflags...)...)
	fails(t, 2, "--allow-plaintext needs --serve", append([]string{"hydrate", "--allow-plaintext"}, hflags...)...)
	_, err := os.Stat(filepath.Join(dir, "meta"))
	require.ErrorIs(t, err, os.ErrNotExist, "a refused hydrate started nothing")

	read := func(uri string) {
		t.Helper()
		c, err := nbd.Dial(context.Background(), uri)
		require.NoError(t, err)
		_, err = c.ReadAt(make([]byte, 4096), 0)
		require.NoError(t, err)
		require.NoError(t, c.Close())
	}
	for _, addr := range []string{"127.0.0.1:0", "localhost:0"} {
		d := startDaemon(t, f.args("serve", "--listen", addr, "--json")...)
		read("nbd://" + d.info.Listen + "/origin")
		d.stop(t)
	}
	sock := filepath.Join(f.dir, "nbd.sock")
	d := startDaemon(t, f.args("serve", "--listen", "", "--socket", sock, "--json")...)
	read("nbd+unix:///origin?socket=" + sock)
	d.stop(t)

	d = startDaemon(t, f.args("serve", "--listen", "0.0.0.0:0", "--allow-plaintext", "--json")...)
	_, port, err := net.SplitHostPort(d.info.Listen)
	require.NoError(t, err)
	read("nbd://127.0.0.1:" + port + "/origin")
	d.stop(t)

	d = startDaemon(t, append([]string{"hydrate", "--serve", "0.0.0.0:0", "--allow-plaintext", "--json"}, hflags...)...)
	_, port, err = net.SplitHostPort(d.info.Listen)
	require.NoError(t, err)
	read("nbd://127.0.0.1:" + port + "/clone")
	d.stop(t)
}

// copyCreds puts the credential files of from into to, each replaced
// whole (written aside, then renamed).
func copyCreds(t *testing.T, from, to string) {
	t.Helper()
	for _, name := range []string{nbd.CACertFile, nbd.ServerCertFile, nbd.ServerKeyFile} {
		b, err := os.ReadFile(filepath.Join(from, name))
		require.NoError(t, err)
		tmp := filepath.Join(to, "."+name+".new")
		require.NoError(t, os.WriteFile(tmp, b, 0o600))
		require.NoError(t, os.Rename(tmp, filepath.Join(to, name)))
	}
}

// SIGHUP reloads serve's certificates without dropping connections: after
// the files are replaced with another CA's, a client that trusts only the
// new CA connects and one that trusts only the old one does not, while a
// connection opened before goes on working; a reload that fails keeps the
// certificates in use and says so.
func TestServeReloadsTLSOnSIGHUP(t *testing.T) {
	f := newFixture(t)
	oldCA, newCA := selfSignedDir(t), selfSignedDir(t)
	creds := t.TempDir()
	copyCreds(t, oldCA, creds)
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--tls", "require", "--tls-creds", creds, "--json")...)
	ctx := context.Background()
	dial := func(trust string) (*nbd.Client, error) {
		return nbd.DialWith(ctx, "nbds://"+d.info.Listen+"/origin", nbd.DialOptions{TLSCertificates: trust})
	}

	open, err := dial(oldCA)
	require.NoError(t, err)
	defer open.Close()
	_, err = open.WriteAt(bytes.Repeat([]byte{0x11}, 4096), 0)
	require.NoError(t, err)
	_, err = dial(newCA)
	require.Error(t, err, "a client trusting only the new CA is refused before the reload")

	copyCreds(t, newCA, creds)
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGHUP))
	d.waitStderr(t, "blocksnap serve: SIGHUP: reloaded the TLS certificates from "+creds)

	c, err := dial(newCA)
	require.NoError(t, err, "a client trusting only the new CA connects after the reload")
	p := make([]byte, 4096)
	_, err = c.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{0x11}, 4096), p)
	require.NoError(t, c.Close())
	_, err = dial(oldCA)
	require.Error(t, err, "a client trusting only the old CA is refused after the reload")

	// The connection opened before the reload still works.
	_, err = open.WriteAt(bytes.Repeat([]byte{0x22}, 4096), 4096)
	require.NoError(t, err)
	require.NoError(t, open.Flush())
	_, err = open.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, byte(0x11), p[0])

	// A broken key: the reload fails, the certificates in use stay.
	require.NoError(t, os.WriteFile(filepath.Join(creds, nbd.ServerKeyFile), []byte("not a key\n"), 0o600))
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGHUP))
	d.waitStderr(t, "blocksnap serve: SIGHUP: reloading the TLS certificates failed, the old ones stay in use: ")
	c, err = dial(newCA)
	require.NoError(t, err, "the certificates loaded last stay in use after a failed reload")
	require.NoError(t, c.Close())
	_, err = open.ReadAt(p, 4096)
	require.NoError(t, err)
	require.Equal(t, byte(0x22), p[0])

	require.NoError(t, open.Close())
	d.stop(t)
	for _, line := range strings.Split(d.stderr.String(), "\n") {
		if strings.HasPrefix(line, "blocksnap serve: SIGHUP") {
			require.NotContains(t, line, "nbd: ", "a library prefix leaked into the reload's log")
		}
	}
}

// hydrate --serve reloads its certificates on SIGHUP too.
func TestHydrateServeReloadsTLSOnSIGHUP(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, bytes.Repeat([]byte{0x3c}, 1<<20), 0o644))
	oldCA, newCA := selfSignedDir(t), selfSignedDir(t)
	creds := t.TempDir()
	copyCreds(t, oldCA, creds)
	d := startDaemon(t, "hydrate", "--serve", "127.0.0.1:0", "--tls", "require", "--tls-creds", creds, "--json",
		"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", filepath.Join(dir, "meta"))
	copyCreds(t, newCA, creds)
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGHUP))
	d.waitStderr(t, "blocksnap hydrate: SIGHUP: reloaded the TLS certificates from "+creds)
	c, err := nbd.DialWith(context.Background(), "nbds://"+d.info.Listen+"/clone", nbd.DialOptions{TLSCertificates: newCA})
	require.NoError(t, err)
	p := make([]byte, 4096)
	_, err = c.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, byte(0x3c), p[0])
	require.NoError(t, c.Close())
	d.stop(t)
}
