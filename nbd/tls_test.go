package nbd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// testCA is a certificate authority made in the test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"blocksnap test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

var serial int64 = 100

// issue makes a certificate and key for cn, for a server (localhost and
// 127.0.0.1) or a client.
func (ca *testCA) issue(t testing.TB, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"blocksnap test"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// certDir writes a certificate directory: ca-cert.pem plus, for a
// server, server-cert.pem and server-key.pem, or for a client with a
// name, client-cert.pem and client-key.pem.
func (ca *testCA) certDir(t testing.TB, server bool, cn string) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, CACertFile), ca.pem, 0o644))
	if cn == "" {
		return dir
	}
	c, k := ca.issue(t, cn, server)
	cf, kf := ClientCertFile, ClientKeyFile
	if server {
		cf, kf = ServerCertFile, ServerKeyFile
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, cf), c, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, kf), k, 0o600))
	return dir
}

// tlsURI is the nbds:// URI of an export of ts with a certificate
// directory.
func tlsURI(ts *testServer, export, dir string) string {
	if ts.addr.Network() == "unix" {
		return fmt.Sprintf("nbds+unix:///%s?socket=%s&tls-certificates=%s", export, url.QueryEscape(ts.addr.String()), url.QueryEscape(dir))
	}
	return fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", ts.addr, export, url.QueryEscape(dir))
}

// tlsFixture is a server with TLS and the directories clients use.
type tlsFixture struct {
	ts        *testServer
	ca        *testCA
	serverDir string
	caOnly    string // ca-cert.pem only: verifies the server, no client certificate
	client1   string // a client certificate "client1" from the same CA
}

func newTLSFixture(t *testing.T, opts Options, exports ...Export) *tlsFixture {
	t.Helper()
	ca := newTestCA(t, "test CA")
	f := &tlsFixture{ca: ca, serverDir: ca.certDir(t, true, "localhost"), caOnly: ca.certDir(t, false, ""),
		client1: ca.certDir(t, false, "client1")}
	opts.TLSCertDir = f.serverDir
	if len(exports) == 0 {
		exports = []Export{{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 4096)}}
	}
	f.ts = startServer(t, opts, exports...)
	return f
}

func TestTLSRequireOurClient(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			ca := newTestCA(t, "test CA")
			srvDir := ca.certDir(t, true, "localhost")
			ts := startServerOn(t, network, Options{TLS: TLSRequire, TLSCertDir: srvDir},
				Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 4096)})
			c := dial(t, tlsURI(ts, "d", ca.certDir(t, false, "")))
			p := make([]byte, 4096)
			p[7] = 7
			_, err := c.WriteAt(p, 8192)
			require.NoError(t, err)
			got := make([]byte, 4096)
			_, err = c.ReadAt(got, 8192)
			require.NoError(t, err)
			require.Equal(t, p, got)
			require.True(t, c.Info().Structured)
			require.True(t, c.Info().BlockStatus)

			// Plaintext is refused with ERR_TLS_REQD, through our client
			// and byte by byte; EXPORT_NAME closes.
			_, err = Dial(context.Background(), ts.uri("d"))
			require.ErrorIs(t, err, ErrTLSRequired)
			r := dialRaw(t, ts)
			r.greet(cflagFixedNewstyle)
			for _, opt := range []uint32{optList, optInfo, optGo, optStructuredReply, optSetMetaContext, 99} {
				r.opt(opt, nil)
				require.Equal(t, repErrTLSReqd, r.reply(opt).typ, "option %d", opt)
			}
			r.opt(optExportName, []byte("d"))
			r.expectClosed()
		})
	}
}

// A server certificate from a CA the client does not trust fails the
// handshake; so does a client certificate from another CA when the server
// verifies clients.
func TestTLSWrongCA(t *testing.T) {
	f := newTLSFixture(t, Options{TLS: TLSRequire, TLSVerifyPeer: true})
	other := newTestCA(t, "other CA")
	_, err := Dial(context.Background(), tlsURI(f.ts, "d", other.certDir(t, false, "client1")))
	require.ErrorContains(t, err, "certificate")
	// Right CA for the server, client certificate from the other CA.
	dir := f.ca.certDir(t, false, "")
	c, k := other.issue(t, "client1", false)
	require.NoError(t, os.WriteFile(filepath.Join(dir, ClientCertFile), c, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ClientKeyFile), k, 0o600))
	_, err = Dial(context.Background(), tlsURI(f.ts, "d", dir))
	require.Error(t, err)
	// No client certificate at all.
	_, err = Dial(context.Background(), tlsURI(f.ts, "d", f.caOnly))
	require.Error(t, err)
	// The right one.
	require.NoError(t, dial(t, tlsURI(f.ts, "d", f.client1)).Flush())
}

// TLSOn: plaintext and TLS clients both work, STARTTLS twice is invalid,
// and negotiation state does not survive the upgrade.
func TestTLSOnSelective(t *testing.T) {
	f := newTLSFixture(t, Options{TLS: TLSOn})
	require.NoError(t, dial(t, f.ts.uri("d")).Flush())
	require.NoError(t, dial(t, tlsURI(f.ts, "d", f.caOnly)).Flush())

	r := dialRaw(t, f.ts)
	r.greet(cflagFixedNewstyle)
	r.opt(optStructuredReply, nil)
	require.Equal(t, repAck, r.reply(optStructuredReply).typ)
	r.opt(optStartTLS, []byte("x"))
	require.Equal(t, repErrInvalid, r.reply(optStartTLS).typ)
	r.opt(optStartTLS, nil)
	require.Equal(t, repAck, r.reply(optStartTLS).typ)
	tc := tls.Client(r.nc, &tls.Config{ServerName: "localhost", RootCAs: certPool(t, f.ca)})
	require.NoError(t, tc.Handshake())
	rt := &raw{t: t, nc: tc}
	rt.opt(optStartTLS, nil)
	require.Equal(t, repErrInvalid, rt.reply(optStartTLS).typ)
	// Structured replies were forgotten: asking again is accepted.
	rt.opt(optStructuredReply, nil)
	require.Equal(t, repAck, rt.reply(optStructuredReply).typ)
}

func certPool(t *testing.T, ca *testCA) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	require.True(t, p.AppendCertsFromPEM(ca.pem))
	return p
}

// Per-export allow-lists: the export is TLS-only, hidden from clients
// that may not use it, and read-only for a read-only entry.
func TestTLSAllowList(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	ca := newTestCA(t, "test CA")
	srvDir := ca.certDir(t, true, "localhost")
	ts := startServer(t, Options{TLS: TLSOn, TLSCertDir: srvDir},
		Export{Name: "open", Device: blockdevtest.NewMem(t, cmdSize, 512)},
		Export{Name: "vm", Device: blockdevtest.NewMem(t, cmdSize, 512), Clients: []ClientAccess{
			{Subject: "writer"},
			{Subject: "CN=reader,O=blocksnap test", ReadOnly: true},
		}})
	writer, reader, stranger := ca.certDir(t, false, "writer"), ca.certDir(t, false, "reader"), ca.certDir(t, false, "stranger")

	w := dial(t, tlsURI(ts, "vm", writer))
	require.False(t, w.Info().ReadOnly)
	_, err := w.WriteAt(make([]byte, 512), 0)
	require.NoError(t, err)
	rd := dial(t, tlsURI(ts, "vm", reader))
	require.True(t, rd.Info().ReadOnly)
	_, err = Dial(context.Background(), tlsURI(ts, "vm", stranger))
	require.ErrorContains(t, err, "not allowed")
	_, err = Dial(context.Background(), ts.uri("vm"))
	require.ErrorIs(t, err, ErrTLSRequired)
	require.NoError(t, dial(t, tlsURI(ts, "open", stranger)).Flush())

	// OPT_LIST shows a stranger only the open export.
	r := dialRaw(t, ts)
	r.greet(cflagFixedNewstyle)
	r.opt(optList, nil)
	reps := r.replies(optList)
	require.Len(t, reps, 2) // one export and the ACK
	require.Equal(t, "open", string(reps[0].data[4:]))

	// An allow-list without TLS is a configuration error.
	_, err = New(Options{}, Export{Name: "x", Device: blockdevtest.NewMem(t, cmdSize, 512), Clients: []ClientAccess{{Subject: "a"}}})
	require.Error(t, err)
}

// ReloadTLS swaps the certificates for new handshakes without dropping
// connections made with the old ones.
func TestTLSReload(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	f := newTLSFixture(t, Options{TLS: TLSRequire})
	old := dial(t, tlsURI(f.ts, "d", f.caOnly))
	// New certificates from a new CA, written over the old files.
	ca2 := newTestCA(t, "second CA")
	c, k := ca2.issue(t, "localhost", true)
	require.NoError(t, os.WriteFile(filepath.Join(f.serverDir, ServerCertFile), c, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(f.serverDir, ServerKeyFile), k, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(f.serverDir, CACertFile), ca2.pem, 0o644))
	// Until the reload, the old certificate is served.
	require.NoError(t, dial(t, tlsURI(f.ts, "d", f.caOnly)).Flush())
	require.NoError(t, f.ts.srv.ReloadTLS())
	_, err := Dial(context.Background(), tlsURI(f.ts, "d", f.caOnly))
	require.Error(t, err, "old CA accepted after the reload")
	require.NoError(t, dial(t, tlsURI(f.ts, "d", ca2.certDir(t, false, ""))).Flush())
	// The old connection still works.
	_, err = old.WriteAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	// A broken directory keeps the old certificates.
	require.NoError(t, os.WriteFile(filepath.Join(f.serverDir, ServerKeyFile), []byte("junk"), 0o600))
	require.Error(t, f.ts.srv.ReloadTLS())
	require.NoError(t, dial(t, tlsURI(f.ts, "d", ca2.certDir(t, false, ""))).Flush())
}

// A client that stalls in the middle of the TLS handshake holds its
// negotiation slot no longer than the handshake deadline, and many such
// clients do not lock out a real one.
func TestTLSStalledHandshake(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	// The deadline is long enough for a real client's handshake under
	// -race on a loaded machine; a stalled client is closed after it.
	f := newTLSFixture(t, Options{TLS: TLSRequire, HandshakeTimeout: time.Second, MaxNegotiating: 4})
	var stalled []*raw
	for range 10 {
		r := dialRaw(t, f.ts)
		r.greet(cflagFixedNewstyle)
		r.opt(optStartTLS, nil)
		require.Equal(t, repAck, r.reply(optStartTLS).typ)
		// The start of a ClientHello, then silence. On a slow machine the
		// server may already have given up on this client and closed it,
		// which is the outcome the test expects anyway: ignore the error.
		_, _ = r.nc.Write([]byte{0x16, 0x03, 0x01})
		stalled = append(stalled, r)
	}
	require.NoError(t, dial(t, tlsURI(f.ts, "d", f.caOnly)).Flush())
	for _, r := range stalled {
		r.expectClosed()
	}
	waitFor(t, "the slots back", func() bool { return f.ts.srv.Stats().Negotiating == 0 })
}

func TestTLSModeAndURIs(t *testing.T) {
	for s, m := range map[string]TLSMode{"off": TLSOff, "on": TLSOn, "require": TLSRequire} {
		got, err := ParseTLSMode(s)
		require.NoError(t, err)
		require.Equal(t, m, got)
		require.Equal(t, s, m.String())
	}
	_, err := ParseTLSMode("yes")
	require.Error(t, err)
	_, err = New(Options{TLS: TLSOn, TLSCertDir: t.TempDir()})
	require.Error(t, err, "TLS without certificates")

	tg, err := parseURI("nbds://example.com:1234/vm?tls-certificates=/etc/pki/x")
	require.NoError(t, err)
	require.Equal(t, target{network: "tcp", addr: "example.com:1234", export: "vm", tls: true, tlsDir: "/etc/pki/x", tlsHost: "example.com"}, tg)
	tg, err = parseURI("nbds+unix:///vm?socket=/run/s.sock&tls-hostname=srv")
	require.NoError(t, err)
	require.Equal(t, target{network: "unix", addr: "/run/s.sock", export: "vm", tls: true, tlsHost: "srv"}, tg)
	tg, err = parseURI("nbds+unix:///?socket=/run/s.sock")
	require.NoError(t, err)
	require.Equal(t, "localhost", tg.tlsHost)
	_, err = Dial(context.Background(), "nbds://127.0.0.1:1/?tls-certificates="+t.TempDir())
	require.ErrorContains(t, err, CACertFile)
}

// In TLSOn mode a TLS-only export refuses metadata context options before
// TLS with ERR_POLICY: the protocol reserves ERR_TLS_REQD for INFO, GO and
// EXPORT_NAME there.
func TestTLSOnMetaContextBeforeTLS(t *testing.T) {
	ca := newTestCA(t, "test CA")
	ts := startServer(t, Options{TLS: TLSOn, TLSCertDir: ca.certDir(t, true, "localhost")},
		Export{Name: "vm", Device: blockdevtest.NewMem(t, cmdSize, 512), Clients: []ClientAccess{{Subject: "writer"}}})
	r := dialRaw(t, ts)
	r.greet(cflagFixedNewstyle)
	r.opt(optStructuredReply, nil)
	require.Equal(t, repAck, r.reply(optStructuredReply).typ)
	r.opt(optSetMetaContext, metaData("vm", "base:allocation"))
	require.Equal(t, repErrPolicy, r.reply(optSetMetaContext).typ)
	r.opt(optInfo, infoData("vm"))
	require.Equal(t, repErrTLSReqd, r.reply(optInfo).typ)
	r.opt(optExportName, []byte("vm"))
	r.expectClosed()
}

// The client over TLS passes the Device conformance suite against our
// server (a 4 KiB-block export, so sub-block requests travel too).
func TestTLSClientConformance(t *testing.T) {
	ca := newTestCA(t, "test CA")
	srvDir, cliDir := ca.certDir(t, true, "localhost"), ca.certDir(t, false, "client1")
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		ts := startServer(t, Options{TLS: TLSRequire, TLSCertDir: srvDir, TLSVerifyPeer: true},
			Export{Name: "m", Device: blockdevtest.NewMem(t, 4<<20, 4096)})
		c, err := Dial(t.Context(), tlsURI(ts, "m", cliDir))
		require.NoError(t, err)
		return c
	})
}

// DialOptions.TLSCertificates names the certificate directory without
// putting a path in the URI, and multi-connection dialing upgrades every
// connection.
func TestTLSDialOptions(t *testing.T) {
	f := newTLSFixture(t, Options{TLS: TLSRequire, TLSVerifyPeer: true})
	uri := fmt.Sprintf("nbds://%s/d", f.ts.addr)
	_, err := Dial(t.Context(), uri)
	require.Error(t, err, "no client certificate, no trusted CA")
	c, err := DialWith(t.Context(), uri, DialOptions{TLSCertificates: f.client1, Connections: 3})
	require.NoError(t, err)
	defer c.Close()
	require.Equal(t, 3, c.Info().Connections)
	require.Equal(t, 3, f.ts.srv.Stats().Established)
	_, err = c.WriteAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
}
