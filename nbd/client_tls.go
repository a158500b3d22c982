package nbd

// TLS for the client: nbds:// and nbds+unix:// URIs upgrade the connection
// with NBD_OPT_STARTTLS as the first option, as the protocol advises a
// client that wants TLS whatever the server offers, and give up if the
// server refuses. The URI's query parameters are libnbd's:
// tls-certificates=DIR names a directory with ca-cert.pem (the CA that
// signed the server's certificate) and, for servers that verify clients,
// client-cert.pem and client-key.pem; tls-hostname=NAME is the name the
// server's certificate must carry (default: the URI's host, "localhost"
// for a Unix socket). Without tls-certificates the system's roots verify
// the server and no client certificate is sent.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// clientTLSConfig builds the TLS configuration of a target.
func clientTLSConfig(t target) (*tls.Config, error) {
	conf := &tls.Config{ServerName: t.tlsHost, MinVersion: tls.VersionTLS12}
	if t.tlsDir == "" {
		return conf, nil
	}
	pool, err := loadCA(t.tlsDir)
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS certificates: %w", err)
	}
	conf.RootCAs = pool
	certFile, keyFile := filepath.Join(t.tlsDir, ClientCertFile), filepath.Join(t.tlsDir, ClientKeyFile)
	if _, err := os.Stat(certFile); errors.Is(err, os.ErrNotExist) {
		return conf, nil // no client certificate: fine unless the server asks
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS client certificate: %w", err)
	}
	conf.Certificates = []tls.Certificate{cert}
	return conf, nil
}

// startTLS sends NBD_OPT_STARTTLS and, on NBD_REP_ACK, runs the TLS
// handshake and moves the connection onto it. Any other answer ends the
// connection: a client that asked for TLS does not fall back to
// plaintext.
func (c *lane) startTLS(conf *tls.Config) error {
	typ, msg, err := c.option(optStartTLS, nil)
	if err != nil {
		return err
	}
	if typ != repAck {
		return fmt.Errorf("nbd: server refused TLS (reply %#x): %s", typ, msg)
	}
	tc := tls.Client(c.nc, conf)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.nc = tc
	c.br = bufio.NewReaderSize(tc, 64<<10)
	c.bw.Reset(tc)
	return nil
}
