package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// waitFor polls cond until it holds; a test that never gets there fails
// after a generous minute instead of hanging.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond) // polling the server's counters
	}
}

// Many idle TCP connections that never say a word do not lock out other
// clients: each new connection beyond MaxNegotiating evicts the oldest
// negotiator, and established connections are counted apart.
func TestLimitsIdleNegotiators(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	ts := startServer(t, Options{MaxNegotiating: 8, MaxConns: 4},
		Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	var idle []net.Conn
	for range 50 {
		nc, err := net.Dial("tcp", ts.addr.String())
		require.NoError(t, err)
		t.Cleanup(func() { nc.Close() })
		idle = append(idle, nc)
	}
	waitFor(t, "50 accepts", func() bool { return ts.srv.Stats().Accepted == 50 })
	st := ts.srv.Stats()
	require.Equal(t, 8, st.Negotiating)
	require.Equal(t, uint64(42), st.Evicted)
	// A real client still gets in, and an evicted connection is closed.
	c := dial(t, ts.uri("d"))
	_, err := c.WriteAt(make([]byte, 512), 0)
	require.NoError(t, err)
	// The first idle connection was evicted: after the greeting, the
	// server hangs up (a read deadline turns a bug into a failure).
	idle[0].SetReadDeadline(time.Now().Add(time.Minute))
	_, err = io.Copy(io.Discard, idle[0])
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "evicted connection left open")
}

// Established connections beyond MaxConns are refused with a message
// that names the limit; idle established ones do not count against
// negotiation, and a closed one frees its slot.
func TestLimitsMaxConns(t *testing.T) {
	ts := startServer(t, Options{MaxConns: 2}, Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	a, b := dial(t, ts.uri("d")), dial(t, ts.uri("d"))
	_, err := Dial(context.Background(), ts.uri("d"))
	require.ErrorContains(t, err, "connection limit (2)")
	// OPT_LIST still works: listing needs no established slot.
	r := dialRaw(t, ts)
	r.greet(cflagFixedNewstyle)
	r.opt(optList, nil)
	require.Len(t, r.replies(optList), 2)
	st := ts.srv.Stats()
	require.Equal(t, 2, st.Established)
	require.Equal(t, uint64(1), st.Refused)
	require.NoError(t, a.Close())
	waitFor(t, "a slot", func() bool { return ts.srv.Stats().Established == 1 })
	c := dial(t, ts.uri("d"))
	require.NoError(t, c.Close())
	require.NoError(t, b.Flush())
}

// A stalled handshake holds its slot no longer than HandshakeTimeout.
func TestLimitsHandshakeDeadline(t *testing.T) {
	ts := startServer(t, Options{HandshakeTimeout: 100 * time.Millisecond, MaxNegotiating: 1},
		Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	r := dialRaw(t, ts)
	r.greet(cflagFixedNewstyle)
	// Half an option header, then silence.
	r.write(be.AppendUint64(nil, magicOpt))
	r.expectClosed()
	waitFor(t, "the slot back", func() bool { return ts.srv.Stats().Negotiating == 0 })
}

// A client that sends big READs and never reads the replies pins no more
// than its connection's budget, all such clients together no more than
// the server's, and a shutdown still completes (without needing its
// context) because replies that make no progress time out.
func TestLimitsReplyMemory(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	srv, err := New(Options{MaxInFlightBytes: MaxRequest, MaxBufferBytes: 2 * MaxRequest},
		Export{Name: "d", Device: blockdevtest.NewMem(t, 64<<20, 4096)})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), l) }()
	ts := &testServer{srv: srv, addr: l.Addr()}
	for i := range 3 {
		r := dialRaw(t, ts)
		r.session("d", true, false)
		// Shrink our receive buffer so that the replies back up soon.
		if tc, ok := r.nc.(*net.TCPConn); ok {
			tc.SetReadBuffer(4096)
		}
		for h := range 8 {
			r.req(cflagDF, cmdRead, uint64(h), uint64(i)*MaxRequest/2, MaxRequest, nil) // DF: data, not a hole
		}
	}
	// Every connection has requests it cannot answer; the server holds
	// at most its total budget meanwhile.
	waitFor(t, "the budget to fill", func() bool { return srv.Stats().BufferBytes == 2*MaxRequest })
	for range 20 {
		require.LessOrEqual(t, srv.Stats().BufferBytes, int64(2*MaxRequest))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	require.NoError(t, srv.Shutdown(ctx), "shutdown had to give up on its context")
	require.NoError(t, <-served)
	require.Equal(t, int64(0), srv.Stats().BufferBytes)
	require.NotZero(t, srv.Stats().WriteTimeouts)
}

// WriteTimeout closes a connection whose client stopped reading, and its
// buffers come back.
func TestLimitsWriteTimeout(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	ts := startServer(t, Options{WriteTimeout: 50 * time.Millisecond},
		Export{Name: "d", Device: blockdevtest.NewMem(t, 64<<20, 4096)})
	r := dialRaw(t, ts)
	r.session("d", true, false)
	for h := range 4 {
		r.req(cflagDF, cmdRead, uint64(h), 0, MaxRequest, nil)
	}
	waitFor(t, "the write timeout", func() bool { return ts.srv.Stats().WriteTimeouts == 1 })
	waitFor(t, "the buffers back", func() bool { return ts.srv.Stats().BufferBytes == 0 })
	r.expectClosed()
	// Others are served as before.
	c := dial(t, ts.uri("d"))
	_, err := c.ReadAt(make([]byte, 4096), 0)
	require.NoError(t, err)
}

// CloseExport closes the connections on one export, waits for their
// requests to leave the device, and leaves other exports alone.
func TestLimitsCloseExport(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	g := newGated(blockdevtest.NewMem(t, cmdSize, 512), 4096)
	ts := startServer(t, Options{}, Export{Name: "a", Device: g}, Export{Name: "b", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	a1, a2, b := dial(t, ts.uri("a")), dial(t, ts.uri("a")), dial(t, ts.uri("b"))
	var eg errgroup.Group
	eg.Go(func() error {
		_, err := a1.ReadAt(make([]byte, 512), 4096) // blocks in the device
		return err
	})
	<-g.entered
	closed := make(chan int, 1)
	closeErr := make(chan error, 1)
	go func() {
		n, err := ts.srv.CloseExport(context.Background(), "a")
		closeErr <- err
		closed <- n
	}()
	// The request is still on the device, so CloseExport cannot have
	// returned.
	waitFor(t, "the connections to be closed", func() bool {
		_, err := a2.ReadAt(make([]byte, 512), 0)
		return err != nil
	})
	select {
	case <-closeErr:
		t.Fatal("CloseExport returned while a request was on the device")
	default:
	}
	close(g.release)
	require.NoError(t, <-closeErr)
	require.Equal(t, 2, <-closed)
	require.Error(t, eg.Wait())
	_, err := b.WriteAt(bytes.Repeat([]byte{1}, 512), 0)
	require.NoError(t, err)
	st := ts.srv.Stats()
	require.Equal(t, int64(0), st.Exports[0].Connections)
	require.Equal(t, uint64(2), st.Exports[0].ConnectionsTotal)
	require.Equal(t, int64(1), st.Exports[1].Connections)
	n, err := ts.srv.CloseExport(context.Background(), "nope")
	require.NoError(t, err)
	require.Zero(t, n)
}

// Stats count requests, bytes and errors per export; WriteMetrics shows
// them in the Prometheus text format.
func TestStatsAndMetrics(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: `we"ird`, Device: blockdevtest.NewMem(t, cmdSize, 512)})
	c := dial(t, ts.uri(`we"ird`))
	_, err := c.WriteAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	_, err = c.ReadAt(make([]byte, 1024), 0)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	r := dialRaw(t, ts)
	r.session(`we"ird`, true, false)
	require.Equal(t, EINVAL, r.errno(0, cmdRead, cmdSize, 512, nil))
	e := ts.srv.Stats().Exports[0]
	require.Equal(t, uint64(4), e.Requests)
	require.Equal(t, uint64(1), e.Errors)
	require.Equal(t, uint64(1024), e.BytesRead)
	require.Equal(t, uint64(4096), e.BytesWritten)
	require.Equal(t, int64(2), e.Connections)
	var buf strings.Builder
	require.NoError(t, ts.srv.WriteMetrics(&buf))
	out := buf.String()
	for _, line := range []string{
		"# TYPE blocksnap_nbd_export_requests_total counter",
		`blocksnap_nbd_export_requests_total{export="we\"ird"} 4`,
		`blocksnap_nbd_export_written_bytes_total{export="we\"ird"} 4096`,
		`blocksnap_nbd_export_connections{export="we\"ird"} 2`,
		"blocksnap_nbd_established_connections 2",
	} {
		require.Contains(t, out, line+"\n")
	}
}

func TestLogLimiter(t *testing.T) {
	var l logLimiter
	t0 := time.Unix(1000, 0)
	for range logBurst {
		ok, dropped := l.allowAt(t0)
		require.True(t, ok)
		require.Zero(t, dropped)
	}
	for range 5 {
		ok, _ := l.allowAt(t0.Add(500 * time.Millisecond))
		require.False(t, ok)
	}
	ok, dropped := l.allowAt(t0.Add(time.Second))
	require.True(t, ok)
	require.Equal(t, 5, dropped)
}

// lockedBuffer is a log destination safe for the server's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A request that fails on the device is logged with the export, the
// command and the range; limits being hit are logged too.
func TestLogDeviceErrorsAndLimits(t *testing.T) {
	var logs lockedBuffer
	f := blockdevtest.NewFaulty(blockdevtest.NewMem(t, cmdSize, 512))
	ts := startServer(t, Options{MaxConns: 1, Logger: slog.New(slog.NewTextHandler(&logs, nil))},
		Export{Name: "d", Device: f})
	c := dial(t, ts.uri("d"))
	f.FailNth(blockdevtest.OpRead, 1, blockdev.ErrIO)
	_, err := c.ReadAt(make([]byte, 512), 1024)
	require.ErrorIs(t, err, EIO)
	_, err = Dial(context.Background(), ts.uri("d"))
	require.Error(t, err)
	out := logs.String()
	require.Contains(t, out, `msg="nbd: device error" export=d`)
	require.Contains(t, out, "command=read offset=1024 length=512")
	require.Contains(t, out, "established connections at their limit")
}

// After Remove and an Add of a new export under the same name,
// CloseExport closes the clients of the removed export, not those of the
// new one; a second CloseExport closes the new one's.
func TestLimitsCloseExportAfterReAdd(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "x", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	old := dial(t, ts.uri("x"))
	require.NoError(t, ts.srv.Remove("x"))
	require.NoError(t, ts.srv.Add(Export{Name: "x", Device: blockdevtest.NewMem(t, cmdSize, 512)}))
	cur := dial(t, ts.uri("x"))
	buf := make([]byte, 512)

	n, err := ts.srv.CloseExport(context.Background(), "x")
	require.NoError(t, err)
	require.Equal(t, 1, n, "connections closed")
	_, err = old.ReadAt(buf, 0)
	require.Error(t, err, "the removed export's client")
	_, err = cur.ReadAt(buf, 0)
	require.NoError(t, err, "the new export's client")

	n, err = ts.srv.CloseExport(context.Background(), "x")
	require.NoError(t, err)
	require.Equal(t, 1, n, "connections closed")
	_, err = cur.ReadAt(buf, 0)
	require.Error(t, err, "the new export's client")
}
