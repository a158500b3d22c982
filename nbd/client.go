package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ExportInfo is what the client learnt about its export.
type ExportInfo struct {
	Name string
	Size int64
	// BlockSize is the device's logical block size: the server's minimum
	// block size rounded up to 512 or 4096.
	BlockSize int
	// MaxRequest is the largest READ or WRITE the client sends; larger
	// calls are split.
	MaxRequest int
	ReadOnly   bool
	Flush      bool // NBD_CMD_FLUSH
	FUA        bool // NBD_CMD_FLAG_FUA
	Trim       bool // NBD_CMD_TRIM
	Zeroes     bool // NBD_CMD_WRITE_ZEROES
	FastZero   bool // NBD_CMD_FLAG_FAST_ZERO
	MultiConn  bool // NBD_FLAG_CAN_MULTI_CONN
	Cache      bool // NBD_CMD_CACHE
	Structured bool // structured replies negotiated
	// BlockStatus: base:allocation was negotiated, so MapAllocation asks
	// the server.
	BlockStatus bool
	// Connections is how many connections the client has open to the
	// export (see DialOptions).
	Connections int
}

// Client is a blockdev.Device over an NBD export. Any number of
// goroutines may use it at once; their requests are in flight together and
// matched to replies by handle.
//
// With DialOptions.Connections above 1 and a server that advertises
// NBD_FLAG_CAN_MULTI_CONN, the client opens several connections (lanes) to
// the export and spreads requests over them, each request to the lane with
// the fewest bytes outstanding. The first lane is kept for small requests
// (up to expressMax bytes): a 4 KiB read never queues behind megabytes of
// bulk reads in the server's per-connection queue or on the socket, which
// is what keeps a clone's user reads fast while it hydrates. Multi-conn
// means the server's cache is shared by the connections: a write completed
// on one lane is seen by reads on every lane, and a flush on any lane
// covers writes completed on all of them, so Flush sends one.
//
// Besides Device it implements blockdev.FUAWriter, blockdev.ZeroWriter and
// blockdev.AllocationMapper. Where the server lacks the feature they fall
// back to what the feature means: FUA to a write and a flush, zeroing to
// writing zero buffers, allocation to "all allocated". Discard is
// NBD_CMD_WRITE_ZEROES without NO_HOLE (the Device contract needs the
// range to read as zeros, which NBD_CMD_TRIM does not promise); Trim sends
// the bare hint.
type Client struct {
	info    ExportInfo
	lanes   []*lane // lanes[0] is the express lane when there are several
	rr      atomic.Uint32
	closing atomic.Bool

	writes  atomic.Uint64 // completed writes, discards and zeroings (client_map.go)
	extents extentCache

	closeOnce sync.Once
}

// lane is one connection of a Client.
type lane struct {
	nc   net.Conn
	br   *bufio.Reader
	info ExportInfo // what this connection's negotiation found

	metaID  uint32
	handles atomic.Uint64
	rhdr    [structReplyLen + 12]byte // reply headers; the reader goroutine's own
	load    atomic.Int64              // bytes of the requests in flight (sent and awaited)
	broken  atomic.Bool               // err is set

	// wmu serialises requests on the socket: it guards bw and whdr.
	// wpending counts senders that want or hold wmu.
	wmu      sync.Mutex
	bw       *bufio.Writer
	whdr     [requestLen]byte
	wpending atomic.Int32

	// mu guards the fields below; never held with wmu.
	mu      sync.Mutex
	pending map[uint64]*call
	err     error         // set once the connection failed or closed
	closing bool          // Close has begun
	drained chan struct{} // closed by the last reply once closing

	readerDone chan struct{}
}

// DialOptions configures DialWith. The zero value is Dial's behaviour.
type DialOptions struct {
	// Connections is the most connections to open to the export; more
	// than one only where the server advertises NBD_FLAG_CAN_MULTI_CONN.
	// 0 means 1. Extra connections the server refuses are done without.
	Connections int
	// TLSCertificates is the certificate directory for an nbds:// URI
	// (ca-cert.pem, and client-cert.pem with client-key.pem for servers
	// that verify clients); it overrides the URI's tls-certificates.
	TLSCertificates string
}

// MaxConnections bounds DialOptions.Connections.
const MaxConnections = 16

// expressMax is the largest request the express lane takes.
const expressMax = 128 << 10

// Dial connects to the export named by uri (nbd://host[:port][/export] or
// nbd+unix:///[export]?socket=PATH; no export name selects the server's
// default export) and negotiates structured replies, the base:allocation
// context and the server's block size constraints. ctx bounds the
// connection and the negotiation. The nbds:// and nbds+unix:// forms
// upgrade to TLS first; see client_tls.go for their tls-certificates and
// tls-hostname parameters. It opens one connection; see DialWith.
func Dial(ctx context.Context, uri string) (*Client, error) {
	return DialWith(ctx, uri, DialOptions{})
}

// DialWith is Dial with options: with Connections above 1 it opens that
// many connections to a multi-conn export.
func DialWith(ctx context.Context, uri string, opts DialOptions) (*Client, error) {
	t, err := parseURI(uri)
	if err != nil {
		return nil, err
	}
	var tlsConf *tls.Config
	if t.tls {
		if opts.TLSCertificates != "" {
			t.tlsDir = opts.TLSCertificates
		}
		if tlsConf, err = clientTLSConfig(t); err != nil {
			return nil, err
		}
	}
	first, err := dialLane(ctx, t, tlsConf)
	if err != nil {
		return nil, fmt.Errorf("nbd: %s: %w", uri, err)
	}
	c := &Client{info: first.info, lanes: []*lane{first}}
	want := min(max(opts.Connections, 1), MaxConnections)
	if want > 1 && first.info.MultiConn {
		extra := make([]*lane, want-1)
		var wg sync.WaitGroup
		for i := range extra {
			wg.Go(func() {
				l, err := dialLane(ctx, t, tlsConf)
				if err == nil && !sameExport(l.info, first.info) {
					l.close()
					err = fmt.Errorf("%w: connections disagree about the export", ErrProtocol)
				}
				if err == nil {
					extra[i] = l
				}
			})
		}
		wg.Wait()
		for _, l := range extra {
			if l != nil {
				c.lanes = append(c.lanes, l)
			}
		}
	}
	c.info.Connections = len(c.lanes)
	return c, nil
}

// sameExport reports whether two negotiations describe the same export.
func sameExport(a, b ExportInfo) bool {
	a.Name, b.Name = "", ""
	return a == b
}

// dialLane opens and negotiates one connection.
func dialLane(ctx context.Context, t target, tlsConf *tls.Config) (*lane, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, t.network, t.addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	l, err := newLane(ctx, nc, t.export, tlsConf)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return l, nil
}

// newLane negotiates over nc (upgrading to TLS first when tlsConf is set)
// and starts the reply reader.
func newLane(ctx context.Context, nc net.Conn, export string, tlsConf *tls.Config) (*lane, error) {
	c := &lane{
		nc:         nc,
		br:         bufio.NewReaderSize(nc, 64<<10),
		bw:         bufio.NewWriterSize(nc, 64<<10),
		pending:    make(map[uint64]*call),
		readerDone: make(chan struct{}),
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	err := c.handshake(export, tlsConf)
	if !stop() || err != nil {
		if err == nil {
			err = ctx.Err()
		}
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	c.info.Connections = 1
	go c.readReplies()
	return c, nil
}

// pick chooses the lane for a request of n bytes: the one with the fewest
// bytes in flight among those that may take it (every lane for a small
// request, all but the express lane for a large one), starting the search
// at a rotating lane so that equal loads spread. Broken lanes are avoided
// while another works.
func (c *Client) pick(n int) *lane {
	ls := c.lanes
	if len(ls) == 1 {
		return ls[0]
	}
	if n > expressMax {
		ls = ls[1:]
	}
	k := int(c.rr.Add(1))
	var best *lane
	var bestLoad int64
	for i := range ls {
		l := ls[(k+i)%len(ls)]
		if l.broken.Load() {
			continue
		}
		if ld := l.load.Load(); best == nil || ld < bestLoad {
			best, bestLoad = l, ld
		}
	}
	if best == nil {
		return ls[0] // all broken: its error is the answer
	}
	return best
}

// Info describes the export and what the server supports.
func (c *Client) Info() ExportInfo { return c.info }

// Size implements blockdev.Device.
func (c *Client) Size() int64 { return c.info.Size }

// BlockSize implements blockdev.Device.
func (c *Client) BlockSize() int { return c.info.BlockSize }

// ReadOnly implements blockdev.ReadOnlyReporter: the server flagged the
// export read-only, so every write, trim and zeroing fails with
// blockdev.ErrReadOnly (without a round trip). An engine given the client
// as a device can so refuse it, or open it read-only, at once.
func (c *Client) ReadOnly() bool { return c.info.ReadOnly }

func (c *Client) check(off, n int64) error {
	if c.closed() {
		return blockdev.ErrClosed
	}
	return blockdev.CheckRange(off, n, c.info.Size, c.info.BlockSize)
}

func (c *Client) checkWrite(off, n int64) error {
	if err := c.check(off, n); err != nil {
		return err
	}
	if c.info.ReadOnly {
		return fmt.Errorf("%w: nbd export %q", blockdev.ErrReadOnly, c.info.Name)
	}
	return nil
}

func (c *Client) closed() bool { return c.closing.Load() }

// ReadAt implements blockdev.Device. Reads above MaxRequest are split into
// requests that are in flight together.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := c.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := c.split(cmdRead, 0, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements blockdev.Device.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	defer c.wrote()
	if err := c.split(cmdWrite, 0, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAtFUA implements blockdev.FUAWriter: NBD_CMD_FLAG_FUA where the
// server offers it, a write and a flush otherwise.
func (c *Client) WriteAtFUA(p []byte, off int64) (int, error) {
	if err := c.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	defer c.wrote()
	if !c.info.FUA {
		if err := c.split(cmdWrite, 0, p, off); err != nil {
			return 0, err
		}
		return len(p), c.Flush()
	}
	if err := c.split(cmdWrite, cflagFUA, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush implements blockdev.Device. A server that does not offer
// NBD_CMD_FLUSH writes through (or promises nothing), so there is
// nothing to send. With several lanes one flush suffices: they exist only
// on a multi-conn export, whose flush covers the writes completed on every
// connection when its reply is sent.
func (c *Client) Flush() error {
	if c.closed() {
		return blockdev.ErrClosed
	}
	if !c.info.Flush {
		return nil
	}
	return c.roundTrip(cmdFlush, 0, 0, 0)
}

// Discard implements blockdev.Device: the range reads as zeros afterwards
// and the server may free it (NBD_CMD_WRITE_ZEROES without NO_HOLE).
func (c *Client) Discard(off, n int64) error {
	if err := c.checkWrite(off, n); err != nil {
		return err
	}
	return c.zero(off, n, 0)
}

// WriteZeroes implements blockdev.ZeroWriter: the range reads as zeros and
// stays allocated (NBD_CMD_WRITE_ZEROES with NO_HOLE).
func (c *Client) WriteZeroes(off, n int64) error {
	if err := c.checkWrite(off, n); err != nil {
		return err
	}
	return c.zero(off, n, cflagNoHole)
}

// Trim sends NBD_CMD_TRIM, a hint that the range is no longer needed;
// afterwards its contents are undefined. Without server support it does
// nothing.
func (c *Client) Trim(off, n int64) error {
	if err := c.checkWrite(off, n); err != nil {
		return err
	}
	if !c.info.Trim {
		return nil
	}
	defer c.wrote()
	return c.ranged(cmdTrim, 0, off, n)
}

// Cache sends NBD_CMD_CACHE: a hint that the range will be read soon.
func (c *Client) Cache(off, n int64) error {
	if err := c.check(off, n); err != nil {
		return err
	}
	if !c.info.Cache {
		return nil
	}
	return c.ranged(cmdCache, 0, off, n)
}

func (c *Client) zero(off, n int64, flags uint16) error {
	defer c.wrote()
	if c.info.Zeroes {
		return c.ranged(cmdWriteZeroes, flags, off, n)
	}
	const chunk = 1 << 20
	p := getBuf(int(min(n, chunk)))
	defer putBuf(p)
	buf := (*p)[:min(n, chunk)]
	clear(buf)
	for n > 0 {
		k := min(n, int64(len(buf)))
		if err := c.split(cmdWrite, 0, buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// ranged sends a command without payload over [off, off+n) in requests of
// at most MaxRequest bytes.
func (c *Client) ranged(typ, flags uint16, off, n int64) error {
	for n > 0 {
		k := min(n, int64(c.info.MaxRequest))
		if err := c.roundTrip(typ, flags, off, k); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Close implements blockdev.Device: it waits for the requests in flight,
// sends NBD_CMD_DISC and closes the connections.
func (c *Client) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
		c.closing.Store(true)
		var wg sync.WaitGroup
		for _, l := range c.lanes {
			wg.Go(l.close)
		}
		wg.Wait()
	})
	if !first {
		return blockdev.ErrClosed
	}
	return nil
}

// close waits for the lane's requests in flight (at most closeWait), sends
// NBD_CMD_DISC (giving up after discWait) and closes the connection.
func (c *lane) close() {
	c.mu.Lock()
	c.closing = true
	c.drained = make(chan struct{})
	if len(c.pending) == 0 || c.err != nil {
		close(c.drained)
	}
	c.mu.Unlock()
	timer := time.NewTimer(closeWait)
	select {
	case <-c.drained:
	case <-timer.C:
		c.fail(fmt.Errorf("nbd: close: requests unanswered after %v", closeWait))
	}
	timer.Stop()
	c.mu.Lock()
	failed := c.err != nil
	c.mu.Unlock()
	if !failed {
		// A server that stopped reading (its receive buffer full)
		// would hold the flush forever; the DISC is only a courtesy.
		// Set before taking wmu, so a sender stuck flushing gives
		// way too.
		c.nc.SetWriteDeadline(time.Now().Add(discWait))
		c.wmu.Lock()
		encodeRequest(c.whdr[:], request{typ: cmdDisc, handle: c.handles.Add(1)})
		c.bw.Write(c.whdr[:])
		c.bw.Flush()
		c.wmu.Unlock()
	}
	c.fail(blockdev.ErrClosed)
	c.nc.Close()
	<-c.readerDone
}

// readFull reads len(p) bytes; a shorter stream is a protocol error.
func readFull(r io.Reader, p []byte) error {
	_, err := io.ReadFull(r, p)
	if err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: connection closed mid-message", ErrProtocol)
	}
	return err
}
