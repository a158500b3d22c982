package nbd

// TLS for the server: NBD_OPT_STARTTLS upgrades a connection during
// negotiation (the protocol's "TLS support" section). The three modes are
// the protocol's NOTLS (TLSOff), SELECTIVETLS (TLSOn: clients may upgrade,
// exports with an allow-list need it) and FORCEDTLS (TLSRequire: nothing
// but STARTTLS and ABORT before the upgrade). Credentials are x509 files
// in the directory layout qemu's tls-creds-x509 and nbdkit's
// --tls-certificates use, so one directory serves all three programs.
// Go's crypto/tls has no PSK cipher suites, so PSK credentials are not
// offered.

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"
)

// TLSMode says whether a Server offers TLS.
type TLSMode int

const (
	// TLSOff: plaintext only; NBD_OPT_STARTTLS is refused with
	// NBD_REP_ERR_POLICY.
	TLSOff TLSMode = iota
	// TLSOn: a client may upgrade with NBD_OPT_STARTTLS; plaintext
	// clients are served too, except on exports with an allow-list of
	// client certificates, which are TLS-only.
	TLSOn
	// TLSRequire: before the upgrade every option but NBD_OPT_STARTTLS
	// and NBD_OPT_ABORT is answered NBD_REP_ERR_TLS_REQD (exports are
	// not even listed) and NBD_OPT_EXPORT_NAME closes the connection.
	TLSRequire
)

// ParseTLSMode parses "off", "on" or "require".
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "off":
		return TLSOff, nil
	case "on":
		return TLSOn, nil
	case "require":
		return TLSRequire, nil
	}
	return TLSOff, fmt.Errorf("nbd: TLS mode %q: want off, on or require", s)
}

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// File names in a certificate directory.
const (
	CACertFile     = "ca-cert.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// ClientAccess allows one client certificate to use an export.
type ClientAccess struct {
	// Subject is matched against the subject of the client's verified
	// certificate: the whole distinguished name as crypto/x509 writes it
	// ("CN=backup,O=Example") or the common name alone ("backup").
	Subject string
	// ReadOnly gives this client a read-only view of the export.
	ReadOnly bool
}

// loadServerTLS reads a certificate directory and builds the server's
// TLS configuration. ca-cert.pem is needed only to verify clients: with
// verifyPeer set, or when an export has an allow-list.
func loadServerTLS(dir string, verifyPeer, needCA bool) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS certificates in %s: %w", dir, err)
	}
	conf := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12, // the protocol's floor
	}
	pool, err := loadCA(dir)
	switch {
	case err == nil:
		conf.ClientCAs = pool
		// Clients without a certificate may still use exports that do
		// not ask for one; a certificate that is given is verified.
		conf.ClientAuth = tls.VerifyClientCertIfGiven
		if verifyPeer {
			conf.ClientAuth = tls.RequireAndVerifyClientCert
		}
	case verifyPeer || needCA:
		return nil, fmt.Errorf("nbd: verifying client certificates: %w", err)
	}
	return conf, nil
}

// loadCA reads ca-cert.pem of a certificate directory.
func loadCA(dir string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate", filepath.Join(dir, CACertFile))
	}
	return pool, nil
}

// tlsState is the server's current TLS configuration; ReloadTLS swaps it.
type tlsState struct {
	conf atomic.Pointer[tls.Config]
}

// needsCA reports whether any export has an allow-list, which needs
// client certificates verified.
func (s *Server) needsCA() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.ContainsFunc(s.order, func(x *export) bool { return len(x.Clients) > 0 })
}

// ReloadTLS reads the certificate directory again. New TLS handshakes use
// the new certificates; connections already open keep theirs and are not
// dropped. On error the old certificates stay in use. A CLI calls it on
// SIGHUP.
func (s *Server) ReloadTLS() error {
	if s.opts.TLS == TLSOff {
		return errors.New("nbd: reload TLS: TLS is off")
	}
	conf, err := loadServerTLS(s.opts.TLSCertDir, s.opts.TLSVerifyPeer, s.needsCA())
	if err != nil {
		return err
	}
	s.tls.conf.Store(conf)
	return nil
}

// tlsOnly reports whether x may be used only over TLS.
func (s *Server) tlsOnly(x *export) bool {
	return s.opts.TLS == TLSRequire || len(x.Clients) > 0
}

// access decides whether this connection may use x, and read-only or
// not. It returns 0, or the option error to answer with.
func (c *conn) access(x *export) (ro bool, refusal uint32) {
	if c.srv.tlsOnly(x) && !c.tlsOn {
		return false, repErrTLSReqd
	}
	if len(x.Clients) == 0 {
		return x.ro, 0
	}
	if c.tlsPeer == nil {
		return false, repErrPolicy
	}
	for _, a := range x.Clients {
		if a.Subject == c.tlsPeer.Subject.String() || a.Subject == c.tlsPeer.Subject.CommonName {
			return x.ro || a.ReadOnly, 0
		}
	}
	return false, repErrPolicy
}

// refusalMessage explains an access refusal to the client.
func refusalMessage(refusal uint32) string {
	if refusal == repErrTLSReqd {
		return "TLS required: send NBD_OPT_STARTTLS first"
	}
	return "client certificate not allowed on this export"
}

// startTLS answers NBD_OPT_STARTTLS and, when it accepts, runs the TLS
// handshake. The handshake runs under the negotiation deadline, so a
// client that stalls in it is closed like any other slow negotiator.
func (c *conn) startTLS(data []byte) error {
	switch {
	case c.srv.opts.TLS == TLSOff:
		return c.optReply(optStartTLS, repErrPolicy, "TLS is not enabled on this server")
	case c.tlsOn:
		return c.optReply(optStartTLS, repErrInvalid, "TLS already negotiated")
	case len(data) != 0:
		return c.optReply(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	}
	if err := c.optReply(optStartTLS, repAck, ""); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	// A client may not send its TLS hello before our ACK, but if bytes
	// are already buffered they belong to the TLS stream: read them
	// through the buffer.
	var under net.Conn = c.raw
	if c.br.Buffered() > 0 {
		under = bufferedConn{Conn: c.raw, r: c.br}
	}
	tc := tls.Server(under, c.srv.tls.conf.Load())
	if err := tc.HandshakeContext(c.ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.nc = tc
	c.br = bufio.NewReaderSize(tc, 64<<10)
	c.tlsOn = true
	if st := tc.ConnectionState(); len(st.VerifiedChains) > 0 {
		c.tlsPeer = st.VerifiedChains[0][0]
	}
	// The protocol: no negotiation state survives the upgrade.
	c.structured, c.meta, c.metaExport = false, false, nil
	return nil
}

// bufferedConn reads through a bufio.Reader that holds bytes already read
// from Conn.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// closeTLS ends a TLS session the client closed with NBD_CMD_DISC the way
// TLS peers expect: our close_notify alert, then whatever the client still
// sends (its own alert) read and dropped until it closes the socket, all
// within drainWriteTimeout; a drain's deadline cuts it short. Closing the
// socket straight after NBD_CMD_DISC made libnbd's shutdown (nbdcopy,
// nbdinfo over nbds://) now and then fail with "server closed socket
// unexpectedly" while it waited for our alert.
func (c *conn) closeTLS() {
	tc, ok := c.nc.(*tls.Conn)
	if !ok || c.draining.Load() {
		return
	}
	c.raw.SetDeadline(time.Now().Add(drainWriteTimeout))
	if err := tc.CloseWrite(); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, c.raw)
}
