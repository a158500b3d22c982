package nbd

// TLS against programs nobody here wrote: qemu-io, qemu-img, nbdinfo and
// nbdcopy against our server, our client against nbdkit and qemu-nbd,
// with certificates made by certtool (GnuTLS, the library those programs
// use). Each test skips, saying why, where a tool is missing.

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/stretchr/testify/require"
)

// gnutlsPKI holds certificate directories made by certtool.
type gnutlsPKI struct {
	server string // ca-cert.pem, server-cert.pem, server-key.pem
	client string // ca-cert.pem, client-cert.pem, client-key.pem (CN=client1)
	// other has a client certificate from another CA, and that CA's
	// certificate as its ca-cert.pem.
	other string
	// mixed trusts the server's CA but holds the other CA's client
	// certificate.
	mixed string
}

// newGnutlsPKI makes a CA, a server certificate for localhost and
// 127.0.0.1, and client certificates, in the layout qemu and nbdkit read.
func newGnutlsPKI(t *testing.T) *gnutlsPKI {
	t.Helper()
	need(t, "certtool")
	work := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(work, name)
		require.NoError(t, os.WriteFile(p, []byte(text), 0o600))
		return p
	}
	key := func(name string) string {
		p := filepath.Join(work, name)
		run(t, "certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", p)
		return p
	}
	ca := func(name string) (certPath, keyPath string) {
		keyPath = key(name + "-key.pem")
		certPath = filepath.Join(work, name+"-cert.pem")
		tmpl := write(name+".info", fmt.Sprintf("cn = %s\nca\ncert_signing_key\nexpiration_days = 2\n", name))
		run(t, "certtool", "--generate-self-signed", "--load-privkey", keyPath, "--template", tmpl, "--outfile", certPath)
		return certPath, keyPath
	}
	issue := func(name, caCert, caKey, tmplText string) (certPath, keyPath string) {
		keyPath = key(name + "-key.pem")
		certPath = filepath.Join(work, name+"-cert.pem")
		tmpl := write(name+".info", tmplText)
		run(t, "certtool", "--generate-certificate", "--load-privkey", keyPath, "--load-ca-certificate", caCert,
			"--load-ca-privkey", caKey, "--template", tmpl, "--outfile", certPath)
		return certPath, keyPath
	}
	caCert, caKey := ca("ca")
	otherCert, otherKey := ca("otherca")
	srvCert, srvKey := issue("server", caCert, caKey,
		"organization = blocksnap test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"+
			"tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n")
	const clientTmpl = "organization = blocksnap test\ncn = client1\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"
	cliCert, cliKey := issue("client", caCert, caKey, clientTmpl)
	othCert, othKey := issue("otherclient", otherCert, otherKey, clientTmpl)

	dir := func(files map[string]string) string {
		d := t.TempDir()
		for name, src := range files {
			b, err := os.ReadFile(src)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(d, name), b, 0o600))
		}
		return d
	}
	return &gnutlsPKI{
		server: dir(map[string]string{CACertFile: caCert, ServerCertFile: srvCert, ServerKeyFile: srvKey}),
		client: dir(map[string]string{CACertFile: caCert, ClientCertFile: cliCert, ClientKeyFile: cliKey}),
		other:  dir(map[string]string{CACertFile: otherCert, ClientCertFile: othCert, ClientKeyFile: othKey}),
		mixed:  dir(map[string]string{CACertFile: caCert, ClientCertFile: othCert, ClientKeyFile: othKey}),
	}
}

// qemuTLSArgs are the arguments that make qemu-io or qemu-img reach an
// export of ts over TLS with the certificates in dir.
func qemuTLSArgs(ts *testServer, export, dir string) []string {
	host, port, _ := net.SplitHostPort(ts.addr.String())
	return []string{
		"--object", "tls-creds-x509,id=tls0,dir=" + dir + ",endpoint=client",
		"--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=%s,tls-creds=tls0", host, port, export),
	}
}

func TestTLSRealClients(t *testing.T) {
	need(t, "qemu-io", "qemu-img", "nbdinfo", "nbdcopy")
	pki := newGnutlsPKI(t)
	mem := blockdevtest.NewMem(t, 16<<20, 4096)
	ts := startServer(t, Options{TLS: TLSRequire, TLSCertDir: pki.server, TLSVerifyPeer: true},
		Export{Name: "d", Device: mem})
	nbds := func(dir string) string {
		return fmt.Sprintf("nbds://%s/d?tls-certificates=%s", ts.addr, dir)
	}

	// qemu-io: write and verify a pattern, 512-byte I/O included.
	args := append(qemuTLSArgs(ts, "d", pki.client),
		"-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
		"-c", "write -P 0xcd 4608 512", "-c", "read -P 0xcd 4608 512", "-c", "flush")
	out := run(t, "qemu-io", args...)
	require.NotContains(t, out, "Pattern verification failed", out)
	got := make([]byte, 4096)
	_, err := mem.ReadAt(got, 4096)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{0xab}, 512), got[:512])
	require.Equal(t, bytes.Repeat([]byte{0xcd}, 512), got[512:1024])

	// qemu-img sees the export's size.
	out = run(t, "qemu-img", append([]string{"info"}, qemuTLSArgs(ts, "d", pki.client)...)...)
	require.Contains(t, out, "16 MiB", out)

	// nbdinfo and nbdcopy with nbds:// URIs.
	out = run(t, "nbdinfo", "--size", nbds(pki.client))
	require.Equal(t, fmt.Sprint(16<<20), strings.TrimSpace(out))
	src := filepath.Join(t.TempDir(), "src")
	want := randomFile(t, src, 16<<20, 7)
	run(t, "nbdcopy", src, nbds(pki.client))
	back := filepath.Join(t.TempDir(), "back")
	run(t, "nbdcopy", nbds(pki.client), back)
	b, err := os.ReadFile(back)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, b), "nbdcopy round trip differs")

	// Refusals: plaintext (ERR_TLS_REQD), a client certificate from
	// another CA, and a server the client's CA did not sign.
	out, err = runErr(t, "nbdinfo", ts.uri("d"))
	require.Error(t, err, out)
	require.Contains(t, strings.ToLower(out), "tls", out)
	out, err = runErr(t, "nbdinfo", nbds(pki.mixed))
	require.Error(t, err, "client certificate from another CA accepted:\n%s", out)
	out, err = runErr(t, "nbdinfo", nbds(pki.other))
	require.Error(t, err, "server certificate from an untrusted CA accepted:\n%s", out)
	out, err = runErr(t, "qemu-img", append([]string{"info"}, qemuTLSArgs(ts, "d", pki.mixed)...)...)
	require.Error(t, err, "qemu-img with a foreign client certificate:\n%s", out)
}

// Our client against nbdkit and qemu-nbd with TLS required and client
// certificates verified.
func TestTLSInteropNbdkit(t *testing.T) {
	need(t, "nbdkit")
	pki := newGnutlsPKI(t)
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	startExternal(t, sock, "nbdkit", "-f", "--exit-with-parent", "--tls=require",
		"--tls-certificates="+pki.server, "--tls-verify-peer", "-U", sock, "memory", "64M")
	uri := "nbds+unix:///?socket=" + sock + "&tls-certificates=" + pki.client
	c := dial(t, uri)
	require.Equal(t, int64(64<<20), c.Size())
	checkAllocation(t, c)
	// Plaintext and a foreign client certificate are refused.
	_, err := Dial(t.Context(), unixURI(sock, ""))
	require.ErrorIs(t, err, ErrTLSRequired)
	_, err = Dial(t.Context(), "nbds+unix:///?socket="+sock+"&tls-certificates="+pki.mixed)
	require.Error(t, err)
}

func TestTLSInteropQemuNbd(t *testing.T) {
	need(t, "qemu-nbd")
	pki := newGnutlsPKI(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	require.NoError(t, os.WriteFile(img, nil, 0o644))
	require.NoError(t, os.Truncate(img, 64<<20))
	sock := filepath.Join(dir, "qemu.sock")
	startExternal(t, sock, "qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "--shared=4",
		"--object", "tls-creds-x509,id=tls0,dir="+pki.server+",endpoint=server,verify-peer=on",
		"--tls-creds", "tls0", img)
	c := dial(t, "nbds+unix:///?socket="+sock+"&tls-certificates="+pki.client)
	require.Equal(t, int64(64<<20), c.Size())
	checkAllocation(t, c)
	_, err := Dial(t.Context(), unixURI(sock, ""))
	require.ErrorIs(t, err, ErrTLSRequired)
}
