// Package archivetest runs a real S3 server for the archive package's
// tests, benchmarks and examples (it does not import archive, so that
// archive's own tests can use it): versitygw serving a local directory on a
// loopback port, which can be killed and restarted, and a TCP proxy that
// slows a server down.
package archivetest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Credentials of every gateway started here.
const (
	AccessKey = "blocksnaptest"
	SecretKey = "blocksnaptestsecret"
)

// ErrNoGateway: versitygw is not installed.
var ErrNoGateway = errors.New("archivetest: versitygw not installed (go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)")

// GatewayPath finds the versitygw binary on PATH or in ~/go/bin.
func GatewayPath() (string, error) {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	home, _ := os.UserHomeDir()
	p := filepath.Join(home, "go", "bin", "versitygw")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", ErrNoGateway
}

// Gateway is a versitygw process serving Dir on Addr.
type Gateway struct {
	Dir, Addr string
	bin       string
	// cert and key are the TLS certificate and key files; empty for a
	// plain HTTP gateway.
	cert, key string
	mu        sync.Mutex // guards cmd
	cmd       *exec.Cmd
}

// StartGateway starts versitygw on a free loopback port with its data in
// dir (created if missing), and waits until it accepts connections.
func StartGateway(dir string) (*Gateway, error) {
	return startGateway(dir, false)
}

// StartGatewayTLS is StartGateway serving HTTPS with a self-signed
// certificate for 127.0.0.1 (kept in DIR.tls).
func StartGatewayTLS(dir string) (*Gateway, error) {
	return startGateway(dir, true)
}

func startGateway(dir string, withTLS bool) (*Gateway, error) {
	bin, err := GatewayPath()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	g := &Gateway{Dir: dir, Addr: addr, bin: bin}
	if withTLS {
		if g.cert, g.key, err = selfSigned(dir + ".tls"); err != nil {
			return nil, err
		}
	}
	return g, g.Start()
}

// Start (re)starts the server on the same port and directory.
func (g *Gateway) Start() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cmd != nil {
		return nil
	}
	args := []string{"--access", AccessKey, "--secret", SecretKey, "--port", g.Addr}
	if g.cert != "" {
		args = append(args, "--cert", g.cert, "--key", g.key)
	}
	cmd := exec.Command(g.bin, append(args, "posix", g.Dir)...)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("archivetest: start versitygw: %w", err)
	}
	g.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", g.Addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("archivetest: versitygw did not listen on %s: %w", g.Addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill stops the server hard (SIGKILL) and waits for it to exit.
func (g *Gateway) Kill() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cmd == nil {
		return
	}
	g.cmd.Process.Kill()
	g.cmd.Wait()
	g.cmd = nil
}

// Client returns a minio client for the server.
func (g *Gateway) Client() (*minio.Client, error) {
	o := &minio.Options{Creds: credentials.NewStaticV4(AccessKey, SecretKey, ""), BucketLookup: minio.BucketLookupPath}
	if g.cert != "" {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} // our own self-signed certificate
		o.Secure, o.Transport = true, t
	}
	return minio.New(g.Addr, o)
}

// MakeBucket creates a bucket.
func (g *Gateway) MakeBucket(ctx context.Context, bucket string) error {
	c, err := g.Client()
	if err != nil {
		return err
	}
	return c.MakeBucket(ctx, bucket, minio.MakeBucketOptions{})
}

// Endpoint is the server's URL, for archive.S3Options.Endpoint (with
// PathStyle and the credentials above).
func (g *Gateway) Endpoint() string {
	if g.cert != "" {
		return "https://" + g.Addr
	}
	return "http://" + g.Addr
}

// CertFile is the TLS gateway's certificate (PEM), to trust as a CA; empty
// for a plain HTTP gateway.
func (g *Gateway) CertFile() string { return g.cert }

// selfSigned writes a self-signed certificate and key for 127.0.0.1 into
// dir and returns their paths.
func selfSigned(dir string) (cert, key string, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "archivetest"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return "", "", err
	}
	pk, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return "", "", err
	}
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	err = errors.Join(
		os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600),
		os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), 0o600))
	return cert, key, err
}

// ObjectPath is where the server keeps an object on disk.
func (g *Gateway) ObjectPath(bucket, key string) string {
	return filepath.Join(g.Dir, bucket, filepath.FromSlash(key))
}

// Proxy forwards TCP connections to a server, sleeping before every chunk
// (up to 16 KiB) it passes back from the server.
type Proxy struct {
	Addr string
	l    net.Listener
	done chan struct{}
	wg   sync.WaitGroup
}

// NewSlowProxy starts a proxy to target on a free loopback port.
func NewSlowProxy(target string, delay time.Duration) (*Proxy, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{Addr: l.Addr().String(), l: l, done: make(chan struct{})}
	p.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.wg.Go(func() { io.Copy(s, c); s.Close() })
			p.wg.Go(func() { p.slowCopy(c, s, delay) })
			p.wg.Go(func() { <-p.done; c.Close(); s.Close() })
		}
	})
	return p, nil
}

func (p *Proxy) slowCopy(c, s net.Conn, delay time.Duration) {
	defer c.Close()
	buf := make([]byte, 16<<10)
	for {
		n, err := s.Read(buf)
		if n > 0 {
			select {
			case <-time.After(delay):
			case <-p.done:
				return
			}
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Close stops the proxy and its connections and waits for them.
func (p *Proxy) Close() {
	close(p.done)
	p.l.Close()
	p.wg.Wait()
}
