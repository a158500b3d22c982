package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/exception"
	"github.com/blocksnap/blocksnap/snapshot"
)

func TestServerShutdownDrainsAndFlushes(t *testing.T) {
	sim := blockdevtest.MustCrashSim(cmdSize, 512)
	g := newGated(sim, 8192)
	srv, err := New(Options{}, Export{Name: "d", Device: g})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), l) }()
	ts := &testServer{srv: srv, addr: l.Addr()}

	r := dialRaw(t, ts)
	r.session("d", true, true)
	p := bytes.Repeat([]byte{0x77}, 4096)
	require.Equal(t, Errno(0), r.errno(0, cmdWrite, 0, 4096, p)) // not flushed by the client
	r.req(0, cmdRead, 2, 8192, 4096, nil)                        // in flight during shutdown
	<-g.entered

	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	close(g.release)
	// The request in flight is answered before the server hangs up.
	c := r.anyReply()
	require.Equal(t, uint64(2), c.handle)
	require.Equal(t, Errno(0), errnoOfReply(t, c))
	r.expectClosed()
	require.NoError(t, <-shut)
	require.NoError(t, <-served)

	// The acknowledged write was flushed by the shutdown: it survives a
	// power cut that drops everything unflushed.
	after := sim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	got := make([]byte, 4096)
	_, err = after.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, p, got)

	// No new connections after shutdown.
	_, err = net.Dial("tcp", l.Addr().String())
	require.Error(t, err)
	require.ErrorIs(t, srv.Serve(context.Background(), l), ErrServerClosed)
}

func TestServerServeContext(t *testing.T) {
	srv, err := New(Options{}, Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	c, err := Dial(context.Background(), URI(l.Addr(), "d"))
	require.NoError(t, err)
	_, err = c.WriteAt(make([]byte, 512), 0)
	require.NoError(t, err)
	cancel()
	require.NoError(t, <-served)
	// The server hung up on the client; its calls fail, they do not hang.
	_, err = c.ReadAt(make([]byte, 512), 0)
	require.Error(t, err)
	require.NoError(t, c.Close())
}

func TestServerMaxConns(t *testing.T) {
	ts := startServer(t, Options{MaxConns: 2}, Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	a, b := dial(t, ts.uri("d")), dial(t, ts.uri("d"))
	_, err := Dial(context.Background(), ts.uri("d"))
	require.Error(t, err, "third connection over the limit")
	require.NoError(t, a.Close())
	// A freed slot is usable again; the server removes the connection
	// once it has hung up, so retry until it has.
	var c *Client
	for i := 0; c == nil; i++ {
		c, err = Dial(context.Background(), ts.uri("d"))
		if err != nil && i > 1000 {
			t.Fatalf("no slot after a close: %v", err)
		}
	}
	require.NoError(t, c.Close())
	require.NoError(t, b.Flush())
}

func TestServerMaxInFlight(t *testing.T) {
	// One worker, two requests in flight: the reader stops reading while
	// the worker is blocked, yet everything is answered once it resumes.
	g := newGated(blockdevtest.NewMem(t, cmdSize, 512), 0)
	ts := startServer(t, Options{Workers: 1, MaxInFlight: 2}, Export{Name: "d", Device: g})
	r := dialRaw(t, ts)
	r.session("d", true, false)
	for h := uint64(1); h <= 20; h++ {
		r.req(0, cmdRead, h, (h-1)*512, 512, nil)
	}
	<-g.entered
	close(g.release)
	seen := map[uint64]bool{}
	for range 20 {
		seen[r.anyReply().handle] = true
	}
	require.Len(t, seen, 20)
}

func TestServerMultiConnFlush(t *testing.T) {
	// CAN_MULTI_CONN promises that a flush on one connection covers
	// writes completed on another.
	sim := blockdevtest.MustCrashSim(cmdSize, 512)
	ts := startServer(t, Options{}, Export{Name: "d", Device: sim})
	a, b := dial(t, ts.uri("d")), dial(t, ts.uri("d"))
	require.True(t, a.Info().MultiConn)
	p := bytes.Repeat([]byte{0x31}, 4096)
	_, err := a.WriteAt(p, 0)
	require.NoError(t, err)
	require.NoError(t, b.Flush())
	after := sim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	got := make([]byte, 4096)
	_, err = after.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, p, got)
}

func TestServerUnixSocket(t *testing.T) {
	ts := startServerOn(t, "unix", Options{}, Export{Name: "u", Device: blockdevtest.NewMem(t, cmdSize, 4096)})
	c := dial(t, ts.uri("u"))
	// Any alignment is served (minimum block size 1), so the client
	// takes its own smallest block size.
	require.Equal(t, 512, c.BlockSize())
	p := bytes.Repeat([]byte{1}, 4096)
	_, err := c.WriteAt(p, 4096)
	require.NoError(t, err)
	got := make([]byte, 4096)
	_, err = c.ReadAt(got, 4096)
	require.NoError(t, err)
	require.Equal(t, p, got)
}

func TestServerExports(t *testing.T) {
	_, err := New(Options{}, Export{Name: "", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	require.Error(t, err)
	_, err = New(Options{}, Export{Name: "x"})
	require.Error(t, err)
	_, err = New(Options{}, Export{Name: "x", Device: blockdevtest.NewMem(t, cmdSize, 512)},
		Export{Name: "x", Device: blockdevtest.NewMem(t, cmdSize, 512)})
	require.Error(t, err)

	ts := startServer(t, Options{DefaultExport: "b"},
		Export{Name: "a", Device: blockdevtest.NewMem(t, cmdSize, 512)},
		Export{Name: "b", Device: blockdevtest.NewMem(t, 2*cmdSize, 512)})
	require.Equal(t, int64(2*cmdSize), dial(t, ts.uri("")).Size())
	require.NoError(t, ts.srv.Add(Export{Name: "c", Device: blockdevtest.NewMem(t, 3*cmdSize, 512)}))
	require.Equal(t, int64(3*cmdSize), dial(t, ts.uri("c")).Size())
	_, err = Dial(context.Background(), ts.uri("nope"))
	require.ErrorIs(t, err, ErrUnknownExport)
	// A *blockdev.ReadOnlyDevice is exported read-only.
	require.NoError(t, ts.srv.Add(Export{Name: "ro", Device: blockdev.ReadOnly(blockdevtest.NewMem(t, cmdSize, 512))}))
	require.True(t, dial(t, ts.uri("ro")).Info().ReadOnly)
}

// Any device that reports itself read-only (blockdev.IsReadOnly) is
// exported read-only, not only the blockdev.ReadOnly view: a slice of one,
// a file opened read-only, and a client of a read-only export re-exported.
// A writable device stays writable.
func TestServerExportsReadOnlyReporters(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ro.img")
	require.NoError(t, os.WriteFile(path, make([]byte, cmdSize), 0o644))
	rofile, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true})
	require.NoError(t, err)
	t.Cleanup(func() { rofile.Close() })
	slice, err := blockdev.Slice(blockdev.ReadOnly(blockdevtest.NewMem(t, 2*cmdSize, 512)), cmdSize, cmdSize)
	require.NoError(t, err)
	ts := startServer(t, Options{},
		Export{Name: "rw", Device: blockdevtest.NewMem(t, cmdSize, 512)},
		Export{Name: "file", Device: rofile},
		Export{Name: "slice", Device: slice},
		Export{Name: "flagged", Device: blockdevtest.NewMem(t, cmdSize, 512), ReadOnly: true})

	rw := dial(t, ts.uri("rw"))
	require.False(t, rw.ReadOnly())
	require.False(t, blockdev.IsReadOnly(rw))
	for _, name := range []string{"file", "slice", "flagged"} {
		c := dial(t, ts.uri(name))
		require.True(t, c.ReadOnly(), name)
		require.True(t, blockdev.IsReadOnly(c), name)
		_, err := c.WriteAt(make([]byte, 512), 0)
		require.ErrorIs(t, err, blockdev.ErrReadOnly, name)
	}

	// A client of the read-only export, itself exported by a second
	// server, is read-only there too, with no flag given.
	inner := dial(t, ts.uri("flagged"))
	ts2 := startServer(t, Options{}, Export{Name: "again", Device: inner})
	again := dial(t, ts2.uri("again"))
	require.True(t, again.Info().ReadOnly)
	err = again.Discard(0, 512)
	require.ErrorIs(t, err, blockdev.ErrReadOnly)
}

func TestServerDeviceErrors(t *testing.T) {
	// Errors of every kind reach the client as errors, mapped to the
	// sentinels a caller tests.
	f := blockdevtest.NewFaulty(blockdevtest.NewMem(t, cmdSize, 512))
	ts := startServer(t, Options{}, Export{Name: "d", Device: f})
	c := dial(t, ts.uri("d"))
	f.FailNth(blockdevtest.OpRead, 1, blockdev.ErrIO)
	_, err := c.ReadAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, blockdev.ErrIO)
	require.ErrorIs(t, err, EIO)
	f.FailNth(blockdevtest.OpFlush, 1, errors.New("disk on fire"))
	require.ErrorIs(t, c.Flush(), blockdev.ErrIO)
	f.FailNth(blockdevtest.OpWrite, 1, blockdev.ErrReadOnly)
	_, err = c.WriteAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, blockdev.ErrReadOnly)
	// And the connection goes on.
	_, err = c.ReadAt(make([]byte, 512), 0)
	require.NoError(t, err)
}

// Every engine's no-space error wraps blockdev.ErrNoSpace, and the server
// answers it with ENOSPC (not EIO), which the client maps back.
func TestServerNoSpace(t *testing.T) {
	f := blockdevtest.NewFaulty(blockdevtest.NewMem(t, cmdSize, 512))
	ts := startServer(t, Options{}, Export{Name: "d", Device: f})
	c := dial(t, ts.uri("d"))
	for _, full := range []error{blockdev.ErrNoSpace, snapshot.ErrNoSpace, exception.ErrNoSpace, exception.ErrOverflow} {
		f.Clear()
		f.FailFrom(blockdevtest.OpWrite, 1, fmt.Errorf("volume v: %w", full))
		_, err := c.WriteAt(make([]byte, 512), 0)
		require.ErrorIs(t, err, ENOSPC, "%v", full)
		require.ErrorIs(t, err, blockdev.ErrNoSpace, "%v", full)
	}
	// A partial-block write fails the same way in its read-modify-write.
	r := dialRaw(t, ts)
	r.session("d", true, false)
	require.Equal(t, ENOSPC, r.errno(0, cmdWrite, 100, 10, make([]byte, 10)))
	st := ts.srv.Stats()
	require.Equal(t, uint64(5), st.Exports[0].Errors)
}

// End to end with a real engine: a clone of a store too small for it,
// exported and written through a client until the store is full. The
// write that finds no space gets ENOSPC (blockdev.ErrNoSpace), the
// connection carries on, and the store stays usable: zeroing and
// trimming what the clone wrote release store space, so that data writes
// succeed again, and every byte reads as the model says.
func TestServerNoSpaceSnapshotStore(t *testing.T) {
	const size, step = 16 << 20, 1 << 20
	st, err := snapshot.Format(blockdevtest.NewMem(t, size, 512), blockdevtest.NewMem(t, 8<<20, 512),
		snapshot.Options{ChunkSize: 64 << 10, CommitInterval: -1})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	origin := st.Origin()
	defer origin.Close()
	base, err := st.CreateSnapshot("base", origin)
	require.NoError(t, err)
	defer base.Close()
	vm, err := st.CreateClone("vm", base)
	require.NoError(t, err)
	defer vm.Close()
	ts := startServer(t, Options{}, Export{Name: "vm", Device: vm})
	c := dial(t, ts.uri("vm"))

	model := make([]byte, size)
	var full int64 = -1
	for off := int64(0); off < size; off += step {
		p := bytes.Repeat([]byte{byte(off/step) + 1}, step)
		_, err := c.WriteAt(p, off)
		if err != nil {
			require.ErrorIs(t, err, ENOSPC)
			require.ErrorIs(t, err, blockdev.ErrNoSpace)
			full = off
			break
		}
		copy(model[off:], p)
	}
	require.Positive(t, full, "a 16 MiB clone does not fit in an 8 MiB store")
	require.Less(t, full+2*step, int64(size), "room left in the clone for the writes below")
	// The failed write may have landed in part; the model takes what the
	// clone reads there.
	_, err = c.ReadAt(model[full:full+step], full)
	require.NoError(t, err, "the connection carries on after ENOSPC")
	_, err = c.WriteAt(bytes.Repeat([]byte{0xee}, step), full+step)
	require.ErrorIs(t, err, ENOSPC, "still full")

	// Zeroes and a trim release what they replace.
	require.NoError(t, c.WriteZeroes(0, 2*step))
	clear(model[:2*step])
	require.NoError(t, c.Discard(2*step, step))
	clear(model[2*step : 3*step])
	p := bytes.Repeat([]byte{0xee}, step)
	_, err = c.WriteAt(p, full+step)
	require.NoError(t, err, "writes succeed once space is released")
	copy(model[full+step:], p)
	require.NoError(t, c.Flush())

	got := make([]byte, size)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(model, got), "the clone reads as the model")
	require.NoError(t, st.Check())
}
