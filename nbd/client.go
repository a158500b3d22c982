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
}

// Client is a blockdev.Device over an NBD export. Any number of
// goroutines may use it at once; their requests are in flight together on
// the one connection and matched to replies by handle.
//
// Besides Device it implements blockdev.FUAWriter, blockdev.ZeroWriter and
// blockdev.AllocationMapper. Where the server lacks the feature they fall
// back to what the feature means: FUA to a write and a flush, zeroing to
// writing zero buffers, allocation to "all allocated". Discard is
// NBD_CMD_WRITE_ZEROES without NO_HOLE (the Device contract needs the
// range to read as zeros, which NBD_CMD_TRIM does not promise); Trim sends
// the bare hint.
type Client struct {
	nc   net.Conn
	br   *bufio.Reader
	info ExportInfo

	metaID  uint32
	handles atomic.Uint64
	rhdr    [structReplyLen + 12]byte // reply headers; the reader goroutine's own

	// wmu serialises requests on the socket: it guards bw and whdr.
	// wpending counts senders that want or hold wmu.
	wmu      sync.Mutex
	bw       *bufio.Writer
	whdr     [requestLen]byte
	wpending atomic.Int32

	// mu guards the fields below.
	mu      sync.Mutex
	pending map[uint64]*call
	err     error         // set once the connection failed or closed
	closing bool          // Close has begun
	drained chan struct{} // closed by the last reply once closing

	readerDone chan struct{}
	closeOnce  sync.Once
	closeErr   error
}

// Dial connects to the export named by uri (nbd://host[:port][/export] or
// nbd+unix:///[export]?socket=PATH; no export name selects the server's
// default export) and negotiates structured replies, the base:allocation
// context and the server's block size constraints. ctx bounds the
// connection and the negotiation. The nbds:// and nbds+unix:// forms
// upgrade to TLS first; see client_tls.go for their tls-certificates and
// tls-hostname parameters.
func Dial(ctx context.Context, uri string) (*Client, error) {
	t, err := parseURI(uri)
	if err != nil {
		return nil, err
	}
	var tlsConf *tls.Config
	if t.tls {
		if tlsConf, err = clientTLSConfig(t); err != nil {
			return nil, err
		}
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, t.network, t.addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", uri, err)
	}
	c, err := newClient(ctx, nc, t.export, tlsConf)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: %s: %w", uri, err)
	}
	return c, nil
}

// newClient negotiates over nc (upgrading to TLS first when tlsConf is
// set) and starts the reply reader.
func newClient(ctx context.Context, nc net.Conn, export string, tlsConf *tls.Config) (*Client, error) {
	c := &Client{
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
	go c.readReplies()
	return c, nil
}

// Info describes the export and what the server supports.
func (c *Client) Info() ExportInfo { return c.info }

// Size implements blockdev.Device.
func (c *Client) Size() int64 { return c.info.Size }

// BlockSize implements blockdev.Device.
func (c *Client) BlockSize() int { return c.info.BlockSize }

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

func (c *Client) closed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

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
// nothing to send.
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

// MapAllocation implements blockdev.AllocationMapper with
// NBD_CMD_BLOCK_STATUS on base:allocation. Without the context every
// range is reported allocated.
func (c *Client) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if err := c.check(off, n); err != nil {
		return 0, blockdev.Allocated, err
	}
	if n == 0 || !c.info.BlockStatus {
		return n, blockdev.Allocated, nil
	}
	bs := int64(c.info.BlockSize)
	ask := min(n, 1<<31)
	cl, err := c.start(cmdBlockStatus, cflagReqOne, uint64(off), uint32(ask), nil, nil)
	if err != nil {
		return 0, blockdev.Allocated, err
	}
	<-cl.done
	cl.finished = true
	length, flags := cl.extLen, cl.extFlags
	if err := c.finish(cl, "block status", off); err != nil {
		return 0, blockdev.Allocated, err
	}
	length = min(length, ask)
	length -= length % bs
	if length <= 0 {
		// An extent smaller than a block: say the block is allocated,
		// which is never wrong.
		return bs, blockdev.Allocated, nil
	}
	switch {
	case flags&(stateHole|stateZero) == stateHole|stateZero:
		return length, blockdev.Hole, nil
	case flags&stateZero != 0:
		return length, blockdev.Zero, nil
	}
	// HOLE without ZERO reads as undefined data: treat it as data.
	return length, blockdev.Allocated, nil
}

// Close implements blockdev.Device: it waits for the requests in flight,
// sends NBD_CMD_DISC and closes the connection.
func (c *Client) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
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
			c.wmu.Lock()
			encodeRequest(c.whdr[:], request{typ: cmdDisc, handle: c.handles.Add(1)})
			c.bw.Write(c.whdr[:])
			c.bw.Flush()
			c.wmu.Unlock()
		}
		c.fail(blockdev.ErrClosed)
		c.closeErr = c.nc.Close()
		<-c.readerDone
	})
	if !first {
		return blockdev.ErrClosed
	}
	return nil
}

// readFull reads len(p) bytes; a shorter stream is a protocol error.
func readFull(r io.Reader, p []byte) error {
	_, err := io.ReadFull(r, p)
	if err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: connection closed mid-message", ErrProtocol)
	}
	return err
}
