package nbd

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/clone"
)

func dialMulti(t *testing.T, uri string, n int) *Client {
	t.Helper()
	c, err := DialWith(context.Background(), uri, DialOptions{Connections: n})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestClientMultiConnConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, 4<<20, 512)})
		c, err := DialWith(t.Context(), ts.uri("m"), DialOptions{Connections: 3})
		require.NoError(t, err)
		require.Equal(t, 3, c.Info().Connections)
		return c
	})
}

// TestClientMultiConnSpreads: concurrent large requests use every bulk
// lane, small ones the express lane, and what is written on one lane is
// read back on the others.
func TestClientMultiConnSpreads(t *testing.T) {
	seed := rand.Uint64()
	if v := os.Getenv("BLOCKSNAP_SEED"); v != "" {
		var err error
		seed, err = strconv.ParseUint(v, 10, 64)
		require.NoError(t, err)
	}
	t.Logf("seed %d (replay with BLOCKSNAP_SEED=%d)", seed, seed)
	const size = 16 << 20
	ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, size, 4096)})
	c := dialMulti(t, ts.uri("m"), 4)
	require.Equal(t, 4, c.Info().Connections)
	img := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := range img {
		img[i] = byte(rng.Uint32())
	}
	const workers = 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			part := img[w*size/workers : (w+1)*size/workers]
			off := int64(w * size / workers)
			for i := 0; i < len(part); i += 1 << 20 {
				if _, err := c.WriteAt(part[i:i+1<<20], off+int64(i)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	got := make([]byte, size)
	var rg sync.WaitGroup
	rerrs := make(chan error, workers)
	for w := range workers {
		rg.Go(func() {
			for off := w * 4096; off < size; off += workers * 4096 {
				if _, err := c.ReadAt(got[off:off+4096], int64(off)); err != nil {
					rerrs <- err
					return
				}
			}
		})
	}
	rg.Wait()
	close(rerrs)
	for err := range rerrs {
		require.NoError(t, err)
	}
	require.True(t, bytes.Equal(img, got))
	for i, l := range c.lanes {
		require.Positive(t, l.handles.Load(), "lane %d carried nothing", i)
		require.Zero(t, l.load.Load(), "lane %d: load left behind", i)
	}
}

// TestClientPick: a large request never takes the express lane; a small
// one takes the least loaded lane, the express lane when the bulk lanes
// are busy; a broken lane is avoided.
func TestClientPick(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, 1<<20, 512)})
	c := dialMulti(t, ts.uri("m"), 3)
	require.Len(t, c.lanes, 3)
	c.lanes[1].load.Store(8 << 20)
	c.lanes[2].load.Store(4 << 20)
	for range 10 {
		require.Same(t, c.lanes[0], c.pick(4096))
		require.Same(t, c.lanes[2], c.pick(1<<20))
	}
	c.lanes[2].broken.Store(true)
	require.Same(t, c.lanes[1], c.pick(1<<20))
	c.lanes[1].load.Store(0)
	c.lanes[2].load.Store(0)
	c.lanes[2].broken.Store(false)
}

// TestClientMultiConnFlush: a write carried by a bulk lane is durable after
// a Flush (sent on whichever lane).
func TestClientMultiConnFlush(t *testing.T) {
	sim := blockdevtest.MustCrashSim(4<<20, 512)
	ts := startServer(t, Options{}, Export{Name: "d", Device: sim})
	c := dialMulti(t, ts.uri("d"), 4)
	p := bytes.Repeat([]byte{0x5c}, 1<<20) // large: a bulk lane
	_, err := c.WriteAt(p, 1<<20)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	after := sim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	got := make([]byte, 1<<20)
	_, err = after.ReadAt(got, 1<<20)
	require.NoError(t, err)
	require.Equal(t, p, got)
}

// TestClientMultiConnRefused: a server that does not advertise multi-conn
// gets one connection whatever was asked.
func TestClientMultiConnRefused(t *testing.T) {
	need(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	startExternal(t, sock, "nbdkit", "-f", "--exit-with-parent", "-U", sock,
		"--filter=multi-conn", "memory", "8M", "multi-conn-mode=disable")
	c := dialMulti(t, unixURI(sock, ""), 4)
	require.False(t, c.Info().MultiConn)
	require.Equal(t, 1, c.Info().Connections)
	p := bytes.Repeat([]byte{1}, 4096)
	_, err := c.WriteAt(p, 0)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
}

// TestClientMultiConnClose: Close closes every lane; later calls fail with
// ErrClosed.
func TestClientMultiConnClose(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "m", Device: blockdevtest.NewMem(t, 1<<20, 512)})
	c, err := DialWith(context.Background(), ts.uri("m"), DialOptions{Connections: 4})
	require.NoError(t, err)
	require.NoError(t, c.Close())
	for _, l := range c.lanes {
		<-l.readerDone
		require.True(t, l.broken.Load())
	}
	_, err = c.ReadAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, blockdev.ErrClosed)
	require.ErrorIs(t, c.Close(), blockdev.ErrClosed)
}

// mappedCounter is an export's device that counts the bytes read from it
// and maps its allocation through the Mem beneath.
type mappedCounter struct {
	*blockdev.Mem
	read atomic.Int64
}

func (m *mappedCounter) ReadAt(p []byte, off int64) (int, error) {
	m.read.Add(int64(len(p)))
	return m.Mem.ReadAt(p, off)
}

// TestClientCloneSource: a clone hydrates from a multi-connection client:
// holes are learnt through base:allocation and never read, they stay holes
// in the destination, and the destination equals the export.
func TestClientCloneSource(t *testing.T) {
	const size = 16 << 20
	mem := blockdevtest.NewMem(t, size, 4096)
	img := make([]byte, size)
	var data int64
	for off := int64(0); off < size; off += 2 << 20 {
		p := img[off : off+512<<10]
		for i := range p {
			p[i] = byte(off>>20) + byte(i) | 1
		}
		_, err := mem.WriteAt(p, off)
		require.NoError(t, err)
		data += int64(len(p))
	}
	src := &mappedCounter{Mem: mem}
	ts := startServer(t, Options{}, Export{Name: "src", Device: src, ReadOnly: true})
	c := dialMulti(t, ts.uri("src"), 3)
	require.True(t, c.Info().BlockStatus)
	dst := blockdevtest.NewMem(t, size, 4096)
	cl, err := clone.Create(c, dst, blockdevtest.NewMem(t, clone.MetadataSize(size, 0), 4096), clone.Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, cl.Wait(ctx))
	st := cl.Status()
	require.NoError(t, cl.Close())
	require.EqualValues(t, data, src.read.Load(), "bytes read from the export")
	require.EqualValues(t, size-data, st.BytesSkipped)
	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got))
	for off := int64(512 << 10); off < size; off += 2 << 20 {
		n, state, err := dst.MapAllocation(off, 1536<<10)
		require.NoError(t, err)
		require.Equal(t, blockdev.Hole, state, "at %d", off)
		require.EqualValues(t, 1536<<10, n)
	}
}

// TestClientMultiConnTLS: every lane of an nbds:// client negotiates TLS
// (the server requires it) and carries I/O.
func TestClientMultiConnTLS(t *testing.T) {
	ca := newTestCA(t, "test CA")
	ts := startServer(t, Options{TLS: TLSRequire, TLSCertDir: ca.certDir(t, true, "localhost")},
		Export{Name: "d", Device: blockdevtest.NewMem(t, 8<<20, 4096)})
	c := dialMulti(t, tlsURI(ts, "d", ca.certDir(t, false, "")), 3)
	require.Equal(t, 3, c.Info().Connections)
	p := bytes.Repeat([]byte{0x42}, 4<<20)
	_, err := c.WriteAt(p, 0) // large: split over the bulk lanes
	require.NoError(t, err)
	got := make([]byte, 4<<20)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, p, got)
	for i, l := range c.lanes[1:] {
		require.Positive(t, l.handles.Load(), "bulk lane %d carried nothing", i+1)
	}
}
