package nbd

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// testServer is a server on 127.0.0.1:0 (or a Unix socket) serving until
// the test ends.
type testServer struct {
	srv  *Server
	addr net.Addr
	done chan error
}

func startServer(t *testing.T, opts Options, exports ...Export) *testServer {
	t.Helper()
	return startServerOn(t, "tcp", opts, exports...)
}

func startServerOn(t *testing.T, network string, opts Options, exports ...Export) *testServer {
	t.Helper()
	srv, err := New(opts, exports...)
	require.NoError(t, err)
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "nbd.sock")
	}
	l, err := net.Listen(network, addr)
	require.NoError(t, err)
	ts := &testServer{srv: srv, addr: l.Addr(), done: make(chan error, 1)}
	go func() { ts.done <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		require.NoError(t, srv.Close())
		require.NoError(t, <-ts.done)
	})
	return ts
}

// uri is the URI of an export of the server.
func (ts *testServer) uri(name string) string { return URI(ts.addr, name) }

func dial(t *testing.T, uri string) *Client {
	t.Helper()
	c, err := Dial(context.Background(), uri)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// counting wraps a device and counts the calls of each kind that reach
// it; it offers FUA and zeroing so that the server's use of them shows.
type counting struct {
	blockdev.Device
	calls [opKinds]atomic.Int64
}

const (
	opRead = iota
	opWrite
	opFUA
	opFlush
	opDiscard
	opZero
	opKinds
)

func (c *counting) n(op int) int64 { return c.calls[op].Load() }

func (c *counting) ReadAt(p []byte, off int64) (int, error) {
	c.calls[opRead].Add(1)
	return c.Device.ReadAt(p, off)
}

func (c *counting) WriteAt(p []byte, off int64) (int, error) {
	c.calls[opWrite].Add(1)
	return c.Device.WriteAt(p, off)
}

func (c *counting) WriteAtFUA(p []byte, off int64) (int, error) {
	c.calls[opFUA].Add(1)
	return blockdev.WriteFUA(c.Device, p, off)
}

func (c *counting) Flush() error {
	c.calls[opFlush].Add(1)
	return c.Device.Flush()
}

func (c *counting) Discard(off, n int64) error {
	c.calls[opDiscard].Add(1)
	return c.Device.Discard(off, n)
}

func (c *counting) WriteZeroes(off, n int64) error {
	c.calls[opZero].Add(1)
	return blockdev.WriteZeroes(c.Device, off, n)
}

func (c *counting) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if m, ok := c.Device.(blockdev.AllocationMapper); ok {
		return m.MapAllocation(off, n)
	}
	return n, blockdev.Allocated, nil
}
