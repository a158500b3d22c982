package nbd

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// exportCounters are one export's counters, updated by every connection
// on it without a lock.
type exportCounters struct {
	conns        atomic.Int64 // connections in the transmission phase now
	connsTotal   atomic.Uint64
	requests     atomic.Uint64
	bytesRead    atomic.Uint64
	bytesWritten atomic.Uint64
	errors       atomic.Uint64 // requests answered with an error
}

// serverCounters are the server's own counters.
type serverCounters struct {
	accepted atomic.Uint64 // connections accepted
	evicted  atomic.Uint64 // negotiating connections closed at MaxNegotiating
	refused  atomic.Uint64 // transmission phases refused at MaxConns
	timeouts atomic.Uint64 // connections closed by WriteTimeout
	buffered atomic.Int64  // buffer bytes held by requests in flight
}

// ExportStats are the counters of one export since it was added.
type ExportStats struct {
	Name string
	// Connections is the number of connections in the transmission phase
	// on the export now; ConnectionsTotal counts every one since Add.
	Connections      int64
	ConnectionsTotal uint64
	// Requests counts the requests answered; Errors those answered with
	// an error.
	Requests uint64
	Errors   uint64
	// BytesRead and BytesWritten count the data of successful READ and
	// WRITE requests (not zeroing or trimming).
	BytesRead    uint64
	BytesWritten uint64
}

// Stats is a snapshot of the server's counters.
type Stats struct {
	// Negotiating and Established count the connections open now in
	// each phase.
	Negotiating int
	Established int
	// Accepted counts the connections accepted; Evicted those closed
	// because MaxNegotiating was reached; Refused the transmission
	// phases refused because MaxConns was reached; WriteTimeouts the
	// connections closed because their replies made no progress.
	Accepted      uint64
	Evicted       uint64
	Refused       uint64
	WriteTimeouts uint64
	// BufferBytes is the buffer memory requests in flight hold now.
	BufferBytes int64
	// Exports holds one entry per export, in the order they were added.
	Exports []ExportStats
}

// Stats returns the server's counters and every export's.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := Stats{Negotiating: s.negotiating, Established: s.established}
	order := append([]*export(nil), s.order...)
	s.mu.Unlock()
	st.Accepted = s.counts.accepted.Load()
	st.Evicted = s.counts.evicted.Load()
	st.Refused = s.counts.refused.Load()
	st.WriteTimeouts = s.counts.timeouts.Load()
	st.BufferBytes = s.counts.buffered.Load()
	for _, x := range order {
		st.Exports = append(st.Exports, ExportStats{
			Name:             x.Name,
			Connections:      x.stats.conns.Load(),
			ConnectionsTotal: x.stats.connsTotal.Load(),
			Requests:         x.stats.requests.Load(),
			Errors:           x.stats.errors.Load(),
			BytesRead:        x.stats.bytesRead.Load(),
			BytesWritten:     x.stats.bytesWritten.Load(),
		})
	}
	return st
}

// WriteMetrics writes the server's counters in the Prometheus text
// exposition format (version 0.0.4), for a /metrics endpoint.
//
// The format is written by hand: it is a dozen lines of text, while
// github.com/prometheus/client_golang would bring a registry, protobuf and
// half a dozen modules into every program that embeds this package, most
// of which never serve metrics.
func (s *Server) WriteMetrics(w io.Writer) error {
	st := s.Stats()
	bw := bufio.NewWriter(w)
	gauge := func(name, help string, v int64) {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s gauge\n%s %d\n", name, help, name, name, v)
	}
	counter := func(name, help string, v uint64) {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	gauge("blocksnap_nbd_negotiating_connections", "Connections in the NBD handshake.", int64(st.Negotiating))
	gauge("blocksnap_nbd_established_connections", "Connections in the NBD transmission phase.", int64(st.Established))
	gauge("blocksnap_nbd_buffer_bytes", "Buffer memory held by requests in flight.", st.BufferBytes)
	counter("blocksnap_nbd_accepted_connections_total", "Connections accepted.", st.Accepted)
	counter("blocksnap_nbd_evicted_connections_total", "Negotiating connections closed at the negotiation limit.", st.Evicted)
	counter("blocksnap_nbd_refused_connections_total", "Transmission phases refused at the connection limit.", st.Refused)
	counter("blocksnap_nbd_write_timeouts_total", "Connections closed because their replies made no progress.", st.WriteTimeouts)
	perExport := []struct {
		name, typ, help string
		v               func(ExportStats) string
	}{
		{"blocksnap_nbd_export_connections", "gauge", "Connections on the export now.",
			func(e ExportStats) string { return fmt.Sprint(e.Connections) }},
		{"blocksnap_nbd_export_connections_total", "counter", "Connections on the export since it was added.",
			func(e ExportStats) string { return fmt.Sprint(e.ConnectionsTotal) }},
		{"blocksnap_nbd_export_requests_total", "counter", "Requests answered.",
			func(e ExportStats) string { return fmt.Sprint(e.Requests) }},
		{"blocksnap_nbd_export_errors_total", "counter", "Requests answered with an error.",
			func(e ExportStats) string { return fmt.Sprint(e.Errors) }},
		{"blocksnap_nbd_export_read_bytes_total", "counter", "Bytes read by READ requests.",
			func(e ExportStats) string { return fmt.Sprint(e.BytesRead) }},
		{"blocksnap_nbd_export_written_bytes_total", "counter", "Bytes written by WRITE requests.",
			func(e ExportStats) string { return fmt.Sprint(e.BytesWritten) }},
	}
	for _, m := range perExport {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.typ)
		for _, e := range st.Exports {
			fmt.Fprintf(bw, "%s{export=\"%s\"} %s\n", m.name, labelEscaper.Replace(e.Name), m.v(e))
		}
	}
	return bw.Flush()
}

// labelEscaper escapes a label value as the text format requires.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// MetricsHandler serves WriteMetrics over HTTP.
func (s *Server) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		if err := s.WriteMetrics(w); err != nil {
			s.opts.Logger.Debug("nbd: write metrics", "err", err)
		}
	})
}

// logLimiter passes at most logBurst lines per second; it counts the
// lines it drops and reports the count with the next line it passes.
type logLimiter struct {
	mu      sync.Mutex // guards the fields below; a leaf lock
	window  time.Time
	n       int
	dropped int
}

const logBurst = 10

// allow reports whether a line may be logged now, and how many were
// dropped since the last one that was.
func (l *logLimiter) allow() (bool, int) { return l.allowAt(time.Now()) }

func (l *logLimiter) allowAt(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	if l.n >= logBurst {
		l.dropped++
		return false, 0
	}
	l.n++
	d := l.dropped
	l.dropped = 0
	return true, d
}

// logLimit logs a limit being hit, rate-limited: a flood of connections
// must not become a flood of log lines.
func (s *Server) logLimit(msg string, args ...any) {
	if ok, dropped := s.limitLog.allow(); ok {
		if dropped > 0 {
			args = append(args, "suppressed", dropped)
		}
		s.opts.Logger.Warn(msg, args...)
	}
}

// logDeviceError logs a request that failed on the device, rate-limited.
func (c *conn) logDeviceError(r *request, err error) {
	ok, dropped := c.srv.devLog.allow()
	if !ok {
		return
	}
	args := []any{"export", c.exp.Name, "remote", c.raw.RemoteAddr(), "command", commandName(r.typ),
		"offset", r.off, "length", r.length, "err", err}
	if dropped > 0 {
		args = append(args, "suppressed", dropped)
	}
	c.srv.opts.Logger.Error("nbd: device error", args...)
}

// commandName names a command for logs.
func commandName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return fmt.Sprintf("command %d", typ)
}
