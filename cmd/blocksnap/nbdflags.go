package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
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
	maxConns      int
}

func addNBDFlags(fs *pflag.FlagSet) *nbdFlags {
	f := &nbdFlags{}
	fs.StringVar(&f.tls, "tls", "off", "NBD over TLS: `MODE` off, on (clients may upgrade) or require")
	fs.StringVar(&f.tlsCreds, "tls-creds", "", "`DIR` holding ca-cert.pem, server-cert.pem and server-key.pem (as for qemu-nbd and nbdkit)")
	fs.BoolVar(&f.tlsVerifyPeer, "tls-verify-peer", false, "require TLS clients to present a certificate signed by ca-cert.pem")
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
