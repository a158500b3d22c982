// Package nbd speaks the Network Block Device protocol: Server exports any
// blockdev.Device to NBD clients (QEMU, qemu-img, nbdcopy, nbdfuse, fio,
// the Linux kernel), and Dial makes a remote export a blockdev.Device.
//
// The server implements fixed newstyle negotiation (OPT_GO, OPT_INFO,
// OPT_EXPORT_NAME, OPT_LIST, OPT_ABORT, structured replies, the
// base:allocation metadata context) and the commands READ, WRITE, FLUSH,
// TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS and CACHE, with the
// FUA flag. Requests of any alignment are served (minimum block size 1;
// partial device blocks by read-modify-write, see subblock.go). Many
// requests are served at once per connection and replies go out in
// completion order. A READ is done before its reply header is sent, so a
// device error reaches the client as an error reply.
//
// Connections still negotiating and established ones have separate limits
// (Options.MaxNegotiating, Options.MaxConns), the handshake has a deadline,
// and the buffer memory of requests in flight is bounded per connection
// and in total, so idle or slow clients cannot lock others out or pin
// memory. Server.Stats and Server.WriteMetrics expose per-export counters;
// Server.CloseExport closes the connections on one export. NBD_OPT_STARTTLS
// upgrades to TLS with x509 credentials (Options.TLS); the client dials
// nbds:// URIs. The repository's docs/nbd.md describes all of this.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Export is one named device a Server offers.
type Export struct {
	// Name is what clients ask for (at most 4096 bytes).
	Name string
	// Description is shown by OPT_LIST and NBD_INFO_DESCRIPTION.
	Description string
	// Device is the exported device. The server never closes it.
	Device blockdev.Device
	// ReadOnly exports the device read-only: writes, trims and zeroing
	// fail with EPERM. A device that reports itself read-only
	// (blockdev.IsReadOnly: a blockdev.ReadOnly view, a File opened
	// read-only, an NBD client of a read-only export) is always exported
	// read-only, so that clients are told up front rather than failing on
	// their first write.
	ReadOnly bool
	// Clients, when not empty, makes the export TLS-only and lets only
	// the client certificates it lists use it (verified against the CA
	// of Options.TLSCertDir). Other clients are refused with
	// NBD_REP_ERR_POLICY and do not see the export in NBD_OPT_LIST.
	Clients []ClientAccess
}

// Options configures a Server. The zero value is a good default.
type Options struct {
	// DefaultExport names the export that the empty name (what
	// nbd://host:port asks for) selects. Empty: the first export.
	DefaultExport string
	// MaxConns bounds the connections in the transmission phase, over
	// all listeners. A client that asks for an export beyond it is
	// refused (NBD_REP_ERR_POLICY, naming the limit) and the refusal is
	// logged. Zero means 256.
	MaxConns int
	// MaxNegotiating bounds the connections still in the handshake,
	// counted apart from MaxConns so that idle or slow handshakes never
	// take an established client's slot. When it is reached, the
	// connection that has negotiated longest is closed to make room (and
	// the eviction is logged): a client that opens connections and says
	// nothing delays others by at most one handshake, never locks them
	// out. Zero means 64.
	MaxNegotiating int
	// MaxInFlight bounds the requests one connection has in flight (read
	// from the socket, not yet answered). Zero means 128.
	MaxInFlight int
	// MaxInFlightBytes bounds the buffer memory one connection's requests
	// in flight hold (write payloads and read replies not yet sent).
	// While it is spent the connection reads no more requests. Zero
	// means 64 MiB; it is raised to MaxRequest if lower.
	MaxInFlightBytes int64
	// MaxBufferBytes bounds the buffer memory of all connections
	// together, the same way. Zero means 256 MiB; it is raised to
	// MaxInFlightBytes if lower.
	MaxBufferBytes int64
	// Workers is the number of goroutines per connection that run
	// requests against the device. Zero means 16.
	Workers int
	// HandshakeTimeout bounds a connection's whole negotiation (the TLS
	// handshake included), from accept to the transmission phase. Zero
	// means 10 seconds, qemu-nbd's handshake limit.
	HandshakeTimeout time.Duration
	// WriteTimeout closes a connection whose replies make no progress:
	// the client has read nothing of them for this long. It frees the
	// buffers a client that never reads would pin. Zero means 30
	// seconds.
	WriteTimeout time.Duration
	// DrainTimeout bounds the graceful drain when a Serve context ends.
	// Zero means 30 seconds. During a drain, a connection whose replies
	// make no progress for drainWriteTimeout is closed.
	DrainTimeout time.Duration
	// Logger receives connection errors, device errors (rate-limited)
	// and limit hits. Nil discards them.
	Logger *slog.Logger

	// TLS selects whether clients may, or must, upgrade to TLS with
	// NBD_OPT_STARTTLS. The zero value is TLSOff.
	TLS TLSMode
	// TLSCertDir holds the server's credentials: ca-cert.pem,
	// server-cert.pem and server-key.pem (the layout of qemu's
	// tls-creds-x509 and nbdkit's --tls-certificates). ca-cert.pem is
	// read only to verify client certificates. Needed unless TLS is
	// TLSOff; Server.ReloadTLS reads it again.
	TLSCertDir string
	// TLSVerifyPeer requires every TLS client to present a certificate
	// signed by ca-cert.pem (mutual TLS). Without it a certificate that
	// is given is verified, and only exports with Clients need one.
	TLSVerifyPeer bool
}

func (o *Options) setDefaults() {
	if o.MaxConns <= 0 {
		o.MaxConns = 256
	}
	if o.MaxNegotiating <= 0 {
		o.MaxNegotiating = 64
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 128
	}
	if o.MaxInFlightBytes <= 0 {
		o.MaxInFlightBytes = 64 << 20
	}
	o.MaxInFlightBytes = max(o.MaxInFlightBytes, MaxRequest)
	if o.MaxBufferBytes <= 0 {
		o.MaxBufferBytes = 256 << 20
	}
	o.MaxBufferBytes = max(o.MaxBufferBytes, o.MaxInFlightBytes)
	if o.Workers <= 0 {
		o.Workers = 16
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 30 * time.Second
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// export is an Export as the server serves it.
type export struct {
	Export
	ro bool
	// locks serialises the read-modify-write of partial blocks against
	// every other write to those blocks, over all connections.
	locks rangeLock
	stats exportCounters
}

// Connection states, guarded by Server.mu.
const (
	connNegotiating = iota
	connEstablished
	connGone // evicted or closed; counted in neither limit
)

// Server serves exports over any number of listeners (TCP, Unix). It is
// safe for concurrent use.
type Server struct {
	opts Options

	// mu guards the fields from here to done. Lock order: Server.mu,
	// then a conn's locks, then an export's range lock (never the other
	// way round).
	mu          sync.Mutex
	exports     map[string]*export
	order       []*export
	withdrawn   map[string][]*export // see CloseExport
	listeners   map[net.Listener]struct{}
	conns       map[*conn]struct{}
	negotiating int // conns in connNegotiating
	established int // conns in connEstablished
	closing     bool
	done        chan struct{} // closed when shutdown starts

	// wg counts connections; Add happens under mu while !closing.
	wg sync.WaitGroup

	// The rest synchronise themselves.
	// budget bounds the buffer bytes of all connections together.
	budget *semaphore.Weighted
	counts serverCounters
	// devLog, limitLog and connLog rate-limit the log lines a client
	// can cause.
	devLog, limitLog, connLog logLimiter
	tls                       tlsState
}

// New returns a server with the given exports (more can be added with
// Add).
func New(opts Options, exports ...Export) (*Server, error) {
	opts.setDefaults()
	s := &Server{
		opts:      opts,
		exports:   make(map[string]*export),
		withdrawn: make(map[string][]*export),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		done:      make(chan struct{}),
		budget:    semaphore.NewWeighted(opts.MaxBufferBytes),
	}
	if opts.TLS < TLSOff || opts.TLS > TLSRequire {
		return nil, fmt.Errorf("nbd: unknown TLS mode %d", int(opts.TLS))
	}
	for _, e := range exports {
		if err := s.Add(e); err != nil {
			return nil, err
		}
	}
	if opts.TLS != TLSOff {
		if err := s.ReloadTLS(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Add makes another export available to new connections.
func (s *Server) Add(e Export) error {
	if e.Device == nil {
		return fmt.Errorf("nbd: export %q: nil device", e.Name)
	}
	if e.Name == "" || len(e.Name) > maxString || len(e.Description) > maxString {
		return fmt.Errorf("nbd: export %q: name must be 1 to %d bytes, description at most %d", e.Name, maxString, maxString)
	}
	if len(e.Clients) > 0 {
		if s.opts.TLS == TLSOff {
			return fmt.Errorf("nbd: export %q: a client allow-list needs TLS", e.Name)
		}
		if s.tls.conf.Load() != nil && s.tls.conf.Load().ClientCAs == nil {
			return fmt.Errorf("nbd: export %q: a client allow-list needs %s in %s", e.Name, CACertFile, s.opts.TLSCertDir)
		}
	}
	x := &export{Export: e, ro: e.ReadOnly || blockdev.IsReadOnly(e.Device)}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[e.Name]; dup {
		return fmt.Errorf("nbd: export %q: name already in use", e.Name)
	}
	s.exports[e.Name] = x
	s.order = append(s.order, x)
	return nil
}

// Remove withdraws the export named name: new connections and OPT_LIST no
// longer see it. Connections already using it keep their device until they
// close, or until CloseExport closes them; the caller decides what that
// device does meanwhile (for a deleted volume: fail every request). The
// name can be added again afterwards; CloseExport(name) still means the
// removed export until it has been called.
func (s *Server) Remove(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	x, ok := s.exports[name]
	if !ok {
		return fmt.Errorf("nbd: remove export %q: %w", name, ErrUnknownExport)
	}
	delete(s.exports, name)
	for i, o := range s.order {
		if o == x {
			s.order = append(s.order[:i], s.order[i+1:]...)
			break
		}
	}
	// Remember it for CloseExport. A withdrawn export gains no
	// connections (establish checks s.exports), so one without any is
	// done with and dropped; the name stays recorded.
	s.withdrawn[name] = inUse(append(s.withdrawn[name], x))
	return nil
}

// inUse returns the exports of xs that have established connections.
// s.mu is held.
func inUse(xs []*export) []*export {
	var out []*export
	for _, x := range xs {
		if x.stats.conns.Load() > 0 {
			out = append(out, x)
		}
	}
	return out
}

// lookup resolves an export name; the empty name is the default export.
func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name == "" {
		name = s.opts.DefaultExport
		if name == "" && len(s.order) > 0 {
			return s.order[0]
		}
	}
	return s.exports[name]
}

func (s *Server) list() []*export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*export(nil), s.order...)
}

// Serve accepts connections on l and serves them until ctx ends or the
// server is shut down. When ctx ends, the server shuts down gracefully
// (as Shutdown, bounded by Options.DrainTimeout) before Serve returns.
// Serve closes l. It returns nil after a shutdown, or the accept error.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()

	stop := context.AfterFunc(ctx, func() {
		dctx, cancel := context.WithTimeout(context.Background(), s.opts.DrainTimeout)
		defer cancel()
		if err := s.Shutdown(dctx); err != nil {
			s.opts.Logger.Warn("nbd: shutdown", "err", err)
		}
	})
	defer stop()

	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			delete(s.listeners, l)
			s.mu.Unlock()
			l.Close()
			if closing {
				// Wait for the shutdown that closed l to finish
				// draining, so that Serve's return means "done".
				<-s.done
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		s.startConn(nc)
	}
}

func (s *Server) startConn(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		// The spec asks both sides to disable Nagle; Go does by default,
		// say so anyway.
		_ = tc.SetNoDelay(true)
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	var evict *conn
	if s.negotiating >= s.opts.MaxNegotiating {
		evict = s.oldestNegotiating()
		evict.state = connGone
		s.negotiating--
		s.counts.evicted.Add(1)
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.negotiating++
	s.counts.accepted.Add(1)
	s.wg.Add(1)
	s.mu.Unlock()
	if evict != nil {
		evict.kill()
		s.logLimit("nbd: negotiating connections at their limit; closed the oldest",
			"limit", s.opts.MaxNegotiating, "closed", evict.raw.RemoteAddr(), "since", evict.started)
	}
	go func() {
		defer s.wg.Done()
		defer close(c.done)
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		switch c.state {
		case connNegotiating:
			s.negotiating--
		case connEstablished:
			s.established--
			c.active.stats.conns.Add(-1)
		}
		c.state = connGone
		s.mu.Unlock()
	}()
}

// oldestNegotiating returns the connection that has negotiated longest.
// s.mu is held and at least one connection is negotiating.
func (s *Server) oldestNegotiating() *conn {
	var old *conn
	for c := range s.conns {
		if c.state == connNegotiating && (old == nil || c.started.Before(old.started)) {
			old = c
		}
	}
	return old
}

// errConnLimit refuses a transmission phase beyond Options.MaxConns.
var errConnLimit = errors.New("nbd: server at its connection limit")

// establish moves c from negotiation to the transmission phase on x. It
// fails when the server is at MaxConns, shutting down, when x was removed
// meanwhile, or when c was evicted.
func (s *Server) establish(c *conn, x *export) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closing:
		return ErrShutdown
	case c.state != connNegotiating:
		return net.ErrClosed
	case s.exports[x.Name] != x:
		return fmt.Errorf("%w: %q was removed", ErrUnknownExport, x.Name)
	case s.established >= s.opts.MaxConns:
		s.counts.refused.Add(1)
		s.logLimit("nbd: established connections at their limit; refused one",
			"limit", s.opts.MaxConns, "remote", c.raw.RemoteAddr(), "export", x.Name)
		return fmt.Errorf("%w (%d)", errConnLimit, s.opts.MaxConns)
	}
	c.state = connEstablished
	c.active = x
	s.negotiating--
	s.established++
	x.stats.conns.Add(1)
	x.stats.connsTotal.Add(1)
	return nil
}

// CloseExport closes every connection in the transmission phase on an
// export named name, and waits until their requests have returned from the
// device and the connections are gone, or ctx ends. Afterwards no request
// of theirs touches the device: the caller can delete or reset the volume
// behind it. To keep new connections out as well, Remove the export first.
// It returns the number of connections closed.
//
// Connections are matched by export, not by name. If Remove withdrew
// exports named name since the last CloseExport of that name, it closes
// the connections on those, and leaves alone an export added under the
// name since: Remove, Add of a new export with the same name, then
// CloseExport closes the old export's clients only. Otherwise it closes
// those on the export now serving under name. If ctx ends first, the
// withdrawn exports stay recorded, so calling again waits for the rest.
func (s *Server) CloseExport(ctx context.Context, name string) (int, error) {
	s.mu.Lock()
	targets, removed := s.withdrawn[name]
	if removed {
		delete(s.withdrawn, name)
	} else if x := s.exports[name]; x != nil {
		targets = []*export{x}
	}
	var victims []*conn
	for c := range s.conns {
		if c.state == connEstablished && slices.Contains(targets, c.active) {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.kill()
	}
	for _, c := range victims {
		select {
		case <-c.done:
		case <-ctx.Done():
			if removed {
				s.mu.Lock()
				s.withdrawn[name] = inUse(append(s.withdrawn[name], targets...))
				s.mu.Unlock()
			}
			return len(victims), fmt.Errorf("nbd: close export %q: %w", name, ctx.Err())
		}
	}
	return len(victims), nil
}

// Shutdown stops the server gracefully: it closes the listeners, stops
// reading new requests, lets every request in flight finish and be
// answered, flushes every export that was written, and closes the
// connections. Connections still negotiating are closed. If ctx ends
// first, the remaining connections are closed at once and ctx's error is
// returned; Shutdown still waits for the requests running on devices.
// Shutdown returns the first flush error otherwise.
func (s *Server) Shutdown(ctx context.Context) error {
	first := s.beginShutdown()
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
	idle := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(idle)
	}()
	var err error
	select {
	case <-idle:
	case <-ctx.Done():
		err = ctx.Err()
		for _, c := range conns {
			c.kill()
		}
		<-idle
	}
	if ferr := s.flushExports(); err == nil {
		err = ferr
	}
	if first {
		close(s.done)
	} else {
		<-s.done
	}
	return err
}

// beginShutdown marks the server closing and closes its listeners. It
// reports whether this call was the first.
func (s *Server) beginShutdown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	return true
}

// flushExports flushes every export, so that a shutdown leaves every
// acknowledged write durable. A device that was never written has nothing
// to flush, and the call is cheap.
func (s *Server) flushExports() error {
	var first error
	for _, x := range s.list() {
		if x.ro {
			continue
		}
		if err := x.Device.Flush(); err != nil && !errors.Is(err, blockdev.ErrClosed) && first == nil {
			first = fmt.Errorf("nbd: flush export %q: %w", x.Name, err)
		}
	}
	return first
}

// Close stops the server at once: listeners and connections are closed
// without draining. It waits for the requests already running on devices
// to return, and does not flush.
func (s *Server) Close() error {
	first := s.beginShutdown()
	s.mu.Lock()
	for c := range s.conns {
		c.kill()
	}
	s.mu.Unlock()
	s.wg.Wait()
	if first {
		close(s.done)
	} else {
		<-s.done
	}
	return nil
}
