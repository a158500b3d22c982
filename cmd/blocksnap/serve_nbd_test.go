package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/nbd"
)

// selfSignedDir writes a TLS credentials directory whose server
// certificate (for 127.0.0.1 and localhost) is its own CA.
func selfSignedDir(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "blocksnap serve test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	dir := t.TempDir()
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	require.NoError(t, os.WriteFile(filepath.Join(dir, nbd.CACertFile), cert, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, nbd.ServerCertFile), cert, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, nbd.ServerKeyFile), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600))
	return dir
}

// serve --tls require refuses plaintext and serves nbds://; --metrics
// counts what a client did; delete closes the connections open on the
// deleted volume.
func TestServeTLSMetricsAndDelete(t *testing.T) {
	f := newFixture(t)
	fails(t, 2, "--tls on needs --tls-creds DIR", f.args("serve", "--tls", "on")...)
	fails(t, 2, "--tls-creds and --tls-verify-peer need --tls on or require", f.args("serve", "--tls-creds", t.TempDir())...)
	fails(t, 2, `--tls "maybe": want off, on or require`, f.args("serve", "--tls", "maybe")...)

	creds := selfSignedDir(t)
	d := startDaemon(t, f.args("serve", "--listen", "127.0.0.1:0", "--tls", "require", "--tls-creds", creds, "--metrics", "127.0.0.1:0", "--json")...)
	require.NotEmpty(t, d.info.Metrics)
	ctx := context.Background()

	_, err := nbd.Dial(ctx, "nbd://"+d.info.Listen+"/origin")
	require.Error(t, err, "a plaintext client is refused under --tls require")

	tlsURI := func(export string) string {
		return "nbds://" + d.info.Listen + "/" + export + "?tls-certificates=" + creds
	}
	c, err := nbd.Dial(ctx, tlsURI("origin"))
	require.NoError(t, err)
	_, err = c.WriteAt(bytes.Repeat([]byte{0x5c}, 64<<10), 0)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	require.NoError(t, c.Close())

	resp, err := http.Get("http://" + d.info.Metrics + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Contains(t, string(body), `blocksnap_nbd_export_written_bytes_total{export="origin"} 65536`)

	ok(t, f.args("snapshot", "s1")...)

	// A rollback leaves the connections on the volume open: the one open
	// across it reads the rolled-back data.
	oc, err := nbd.Dial(ctx, tlsURI("origin"))
	require.NoError(t, err)
	_, err = oc.WriteAt(bytes.Repeat([]byte{0x77}, 4096), 0)
	require.NoError(t, err)
	require.NoError(t, oc.Flush())
	require.Contains(t, ok(t, f.args("rollback", "origin", "--to", "s1")...), "rolled origin back to s1")
	q := make([]byte, 4096)
	_, err = oc.ReadAt(q, 0)
	require.NoError(t, err, "the connection open across the rollback stays open")
	require.Equal(t, bytes.Repeat([]byte{0x5c}, 4096), q)
	require.NoError(t, oc.Close())

	sc, err := nbd.Dial(ctx, tlsURI("s1"))
	require.NoError(t, err)
	defer sc.Close()
	p := make([]byte, 4096)
	_, err = sc.ReadAt(p, 0)
	require.NoError(t, err)
	require.Equal(t, byte(0x5c), p[0])
	// A volume with a client connected is deleted only with --force,
	// which closes the connection.
	fails(t, 1, "volume is in use: s1 has 1 connected NBD client(s); delete --force closes their connections", f.args("delete", "s1")...)
	_, err = sc.ReadAt(p, 0)
	require.NoError(t, err, "the refused delete left the client alone")
	ok(t, f.args("delete", "s1", "--force")...)
	_, err = sc.ReadAt(p, 0)
	require.Error(t, err, "the connection on a deleted volume is closed")

	d.stop(t)
	require.Equal(t, bytes.Repeat([]byte{0x5c}, 64<<10), f.image(t, "origin")[:64<<10])
}
