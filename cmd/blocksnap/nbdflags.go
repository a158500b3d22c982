package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/nbd"
)

// nbdFlags are the NBD server flags of serve and hydrate --serve.
type nbdFlags struct {
	metrics       string
	tls           string
	tlsCreds      string
	tlsVerifyPeer bool
	plaintext     bool // --allow-plaintext
	maxConns      int
}

func addNBDFlags(fs *pflag.FlagSet) *nbdFlags {
	f := &nbdFlags{}
	fs.StringVar(&f.tls, "tls", "off", "NBD over TLS: `MODE` off, on (clients may upgrade) or require")
	fs.StringVar(&f.tlsCreds, "tls-creds", "", "`DIR` holding ca-cert.pem, server-cert.pem and server-key.pem (as for qemu-nbd and nbdkit)")
	fs.BoolVar(&f.tlsVerifyPeer, "tls-verify-peer", false, "require TLS clients to present a certificate signed by ca-cert.pem")
	fs.BoolVar(&f.plaintext, "allow-plaintext", false, "serve without TLS on an address other than loopback (anyone who can reach it can read and overwrite the writable exports)")
	fs.IntVar(&f.maxConns, "max-conns", 0, "most NBD connections in the transmission phase at once (`N`; 0: 256)")
	fs.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics (requests, bytes, errors, connections per export) over HTTP on `ADDR` at /metrics")
	return f
}

// options returns the server options the flags ask for; log receives the
// server's warnings (connection and device errors, limits hit).
func (f *nbdFlags) options(base nbd.Options, log io.Writer) (nbd.Options, error) {
	mode, err := nbd.ParseTLSMode(f.tls)
	if err != nil {
		return base, usagef("--tls %q: want off, on or require", f.tls)
	}
	switch {
	case mode != nbd.TLSOff && f.tlsCreds == "":
		return base, usagef("--tls %s needs --tls-creds DIR", mode)
	case mode == nbd.TLSOff && (f.tlsCreds != "" || f.tlsVerifyPeer):
		return base, usagef("--tls-creds and --tls-verify-peer need --tls on or require")
	case f.maxConns < 0:
		return base, usagef("--max-conns %d: want 0 or more", f.maxConns)
	}
	base.TLS, base.TLSCertDir, base.TLSVerifyPeer, base.MaxConns = mode, f.tlsCreds, f.tlsVerifyPeer, f.maxConns
	base.Logger = slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return base, nil
}

// checkListen refuses a plaintext NBD server (--tls off) on a TCP address
// that is not loopback, unless --allow-plaintext was given: anyone who can
// reach the port could read and overwrite every writable export.
func (f *nbdFlags) checkListen(flag, addr string) error {
	if f.plaintext || f.tls != "off" || addr == "" || isLoopback(addr) {
		return nil
	}
	return usagef("refusing to serve NBD without TLS on %[2]s (%[1]s), which is not a loopback address: anyone who can reach the port can read and overwrite every writable export; "+
		"give --tls require --tls-creds DIR, or --allow-plaintext to serve it anyway", flag, addr)
}

// isLoopback reports whether a TCP listen address ("HOST:PORT") is on
// loopback only: 127.0.0.0/8, ::1 or localhost. A wildcard (empty host,
// 0.0.0.0, ::) and any other host name are not. An address that does not
// split is left for net.Listen to refuse.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return true
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.WithZone("").Unmap().IsLoopback()
}

// reloadOnHangup reloads srv's TLS certificates on every SIGHUP, until
// the returned function is called (it stops the signal delivery and waits
// for the goroutine). The outcome goes to log; a failed reload keeps the
// certificates in use. With TLS off it does nothing.
func reloadOnHangup(srv *nbd.Server, opts nbd.Options, prog string, log io.Writer) (stop func()) {
	if opts.TLS == nbd.TLSOff {
		return func() {}
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			case <-hup:
				if err := srv.ReloadTLS(); err != nil {
					fmt.Fprintf(log, "blocksnap %s: SIGHUP: reloading the TLS certificates failed, the old ones stay in use: %s\n", prog, message(err))
				} else {
					fmt.Fprintf(log, "blocksnap %s: SIGHUP: reloaded the TLS certificates from %s\n", prog, opts.TLSCertDir)
				}
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
		wg.Wait()
	}
}

// metricsServer serves an NBD server's metrics over HTTP until stopped.
type metricsServer struct {
	addr string
	srv  *http.Server
	wg   sync.WaitGroup // the serving goroutine
}

// serveMetrics listens on addr ("": no server, nil) and serves srv's
// metrics at /metrics; a failure of the HTTP server later is reported on
// log (the NBD server goes on).
func serveMetrics(addr string, srv *nbd.Server, log io.Writer) (*metricsServer, error) {
	if addr == "" {
		return nil, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", srv.MetricsHandler())
	m := &metricsServer{addr: l.Addr().String(), srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := m.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(log, "blocksnap: metrics server on %s stopped: %v\n", m.addr, err)
		}
	}()
	return m, nil
}

// stop shuts the metrics server down and waits for it.
func (m *metricsServer) stop() {
	if m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(ctx); err != nil {
		m.srv.Close()
	}
	m.wg.Wait()
}
