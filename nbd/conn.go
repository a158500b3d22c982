package nbd

import (
	"bufio"
	"context"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
)

// conn is one client connection. The goroutine running serve negotiates,
// then becomes the reader of the transmission phase: it reads requests
// (and write payloads) and hands them to a fixed set of worker goroutines,
// which run them against the device and write the replies. Replies are
// serialised by wmu; the last writer out flushes, so replies that complete
// together leave in one batch.
type conn struct {
	srv *Server
	raw net.Conn // the socket; closing it stops everything
	nc  net.Conn // what the protocol runs over: raw, or TLS over raw
	br  *bufio.Reader

	started time.Time     // accept time; the oldest negotiator is evicted first
	done    chan struct{} // closed when serve has returned

	// Guarded by Server.mu.
	state  int     // connNegotiating, connEstablished or connGone
	active *export // the export of an established connection

	// Negotiation state, owned by the serve goroutine until workers start,
	// read-only afterwards.
	noZeroes   bool
	fixed      bool              // the client set FIXED_NEWSTYLE
	tlsOn      bool              // NBD_OPT_STARTTLS succeeded
	tlsPeer    *x509.Certificate // the client's verified certificate, if any
	ro         bool              // this connection may not write (export or client read-only)
	structured bool
	meta       bool    // base:allocation selected for metaExport
	metaExport *export // export the metadata contexts were set for
	exp        *export
	size       int64
	bs         int64
	flags      uint16
	opt        []byte // option data buffer

	work    chan *task
	workers sync.WaitGroup
	budget  *semaphore.Weighted // bytes of buffers held by requests in flight
	ctx     context.Context     // ends when the connection is killed
	cancel  context.CancelFunc

	draining atomic.Bool // stop reading requests; finish those in flight
	dirty    atomic.Bool // a write, trim or zeroing has been done
	wstalled atomic.Bool // a reply write ran past its deadline
	// transmitting is set by serve before the workers start: reply
	// writes then carry WriteTimeout. Before, the handshake deadline
	// bounds them.
	transmitting bool

	// wmu serialises replies: it guards bw, whdr and werr. wpending
	// counts writers that want wmu or hold it.
	wmu      sync.Mutex
	bw       *bufio.Writer
	whdr     [32]byte
	werr     error
	wpending atomic.Int32
}

// task is a request on its way through a connection. Tasks and their
// buffers are pooled, so the request path does not allocate.
type task struct {
	req   request
	errno Errno  // set by the reader when the request is already refused
	buf   []byte // write payload, or read buffer
	pbuf  *[]byte
	held  int64 // budget bytes held
}

var taskPool = sync.Pool{New: func() any { return new(task) }}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:     s,
		raw:     nc,
		nc:      nc,
		started: time.Now(),
		done:    make(chan struct{}),
		budget:  semaphore.NewWeighted(s.opts.MaxInFlightBytes),
	}
	c.br = bufio.NewReaderSize(nc, 64<<10)
	c.bw = bufio.NewWriterSize(replyWriter{c}, 64<<10)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// replyWriter writes to the connection in pieces of at most
// replyChunk bytes, each with its own write deadline: a reply times out
// when the client stops reading it, not when it is merely large.
type replyWriter struct{ c *conn }

const (
	replyChunk = 256 << 10
	// drainWriteTimeout replaces WriteTimeout once a drain has begun:
	// a client that reads nothing for this long while the server shuts
	// down does not get to hold the shutdown for the whole drain.
	drainWriteTimeout = 2 * time.Second
)

func (w replyWriter) Write(p []byte) (int, error) {
	c := w.c
	if !c.transmitting {
		return c.nc.Write(p)
	}
	timeout := c.srv.opts.WriteTimeout
	if c.draining.Load() {
		timeout = min(timeout, drainWriteTimeout)
	}
	done := 0
	for done < len(p) {
		k := min(len(p)-done, replyChunk)
		c.nc.SetWriteDeadline(time.Now().Add(timeout))
		n, err := c.nc.Write(p[done : done+k])
		done += n
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && c.wstalled.CompareAndSwap(false, true) {
				c.srv.counts.timeouts.Add(1)
				c.srv.logLimit("nbd: client stopped reading replies; closing", "remote", c.raw.RemoteAddr(), "timeout", timeout)
			}
			return done, err
		}
	}
	return done, nil
}

// drain asks the connection to stop taking requests, answer those in
// flight and close. A connection still negotiating is closed.
func (c *conn) drain() {
	c.draining.Store(true)
	c.raw.SetReadDeadline(time.Now())
	// A reply blocked now would keep its WriteTimeout deadline; cut it
	// to the drain's. Replies still moving renew it piece by piece.
	c.raw.SetWriteDeadline(time.Now().Add(min(c.srv.opts.WriteTimeout, drainWriteTimeout)))
}

// kill closes the connection at once. Closing the socket under a TLS
// connection, not the TLS connection, never blocks on a close alert to a
// client that does not read.
func (c *conn) kill() {
	c.draining.Store(true)
	c.cancel()
	c.raw.Close()
}

func (c *conn) logErr(msg string, err error) {
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, errAbort) {
		return
	}
	// Rate-limited: a client can fail handshakes as fast as it connects.
	if ok, dropped := c.srv.connLog.allow(); ok {
		args := []any{"remote", c.raw.RemoteAddr(), "err", err}
		if dropped > 0 {
			args = append(args, "suppressed", dropped)
		}
		c.srv.opts.Logger.Warn(msg, args...)
	}
}

func (c *conn) serve() {
	defer c.kill()
	c.raw.SetDeadline(time.Now().Add(c.srv.opts.HandshakeTimeout))
	if c.draining.Load() {
		return
	}
	x, err := c.negotiate()
	if err != nil {
		c.logErr("nbd: negotiation", err)
		return
	}
	c.raw.SetDeadline(time.Time{})
	if c.draining.Load() {
		// A drain that raced with the deadline reset above.
		return
	}
	c.exp = x
	c.transmitting = true
	c.transmit()
}

// transmit runs the transmission phase until the client disconnects, the
// stream breaks or the server drains the connection.
func (c *conn) transmit() {
	n := c.srv.opts.Workers
	c.work = make(chan *task, max(c.srv.opts.MaxInFlight-n, 1))
	c.workers.Add(n)
	for range n {
		go c.worker()
	}
	err := c.readRequests()
	c.logErr("nbd: read request", err)
	close(c.work)
	c.workers.Wait()
	if c.dirty.Load() {
		// Not required by the protocol, but a client that disconnects
		// without a flush should not lose more than it must.
		if err := c.exp.Device.Flush(); err != nil {
			c.logErr("nbd: flush on disconnect", err)
		}
	}
	if err == nil {
		c.closeTLS() // every reply is written: the workers have ended
	}
}

// readRequests reads requests until NBD_CMD_DISC or an error.
func (c *conn) readRequests() error {
	var h [requestLen]byte
	for !c.draining.Load() {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		req, ok := decodeRequest(h[:])
		if !ok {
			// Without the magic there is no telling where the next
			// request starts: hard disconnect.
			c.kill()
			return ErrProtocol
		}
		if req.typ == cmdDisc {
			return nil
		}
		t := taskPool.Get().(*task)
		t.req = req
		if err := c.admit(t); err != nil {
			c.release(t)
			return err
		}
		c.work <- t
	}
	return nil
}

// admit takes the buffer budget of a READ or WRITE and reads a WRITE's
// payload. Requests too large to take are refused with EINVAL; a too
// large write's payload is skipped, keeping the stream in step.
func (c *conn) admit(t *task) error {
	n := int64(t.req.length)
	switch t.req.typ {
	case cmdRead:
		if n > MaxRequest {
			t.errno = EINVAL
			return nil
		}
	case cmdWrite:
		if n > MaxRequest {
			t.errno = EINVAL
			_, err := io.CopyN(io.Discard, c.br, n)
			return err
		}
	default:
		return nil
	}
	if err := c.budget.Acquire(c.ctx, n); err != nil {
		return err
	}
	if err := c.srv.budget.Acquire(c.ctx, n); err != nil {
		c.budget.Release(n)
		return err
	}
	c.srv.counts.buffered.Add(n)
	t.held = n
	t.pbuf = getBuf(int(n))
	t.buf = (*t.pbuf)[:n]
	if t.req.typ == cmdWrite {
		if _, err := io.ReadFull(c.br, t.buf); err != nil {
			return err
		}
	}
	return nil
}

// release returns a task's buffer, budget and itself to their pools.
func (c *conn) release(t *task) {
	if t.pbuf != nil {
		putBuf(t.pbuf)
	}
	if t.held > 0 {
		c.srv.counts.buffered.Add(-t.held)
		c.srv.budget.Release(t.held)
		c.budget.Release(t.held)
	}
	*t = task{}
	taskPool.Put(t)
}

func (c *conn) worker() {
	defer c.workers.Done()
	for t := range c.work {
		if c.ctx.Err() == nil {
			c.handle(t)
		}
		c.release(t)
	}
}

// lockW takes the reply lock; unlockW releases it, flushing if no other
// reply is waiting. A failed write kills the connection.
func (c *conn) lockW() {
	c.wpending.Add(1)
	c.wmu.Lock()
}

func (c *conn) unlockW() {
	if c.wpending.Add(-1) == 0 && c.werr == nil {
		c.werr = c.bw.Flush()
		if c.werr != nil {
			c.kill()
		}
	}
	c.wmu.Unlock()
}

// replyOK answers a request that returns no data.
func (c *conn) replyOK(handle uint64) {
	c.lockW()
	putSimpleReply(c.whdr[:], 0, handle)
	c.bw.Write(c.whdr[:simpleReplyLen])
	c.unlockW()
}

// replyErr answers a request with an error: an error chunk (with a
// message for the human at the client) where structured replies were
// negotiated, a simple reply otherwise.
func (c *conn) replyErr(r *request, errno Errno, msg string) {
	c.lockW()
	defer c.unlockW()
	if !c.structured {
		putSimpleReply(c.whdr[:], uint32(errno), r.handle)
		c.bw.Write(c.whdr[:simpleReplyLen])
		return
	}
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	putChunkHeader(c.whdr[:], replyFlagDone, chunkError, r.handle, uint32(6+len(msg)))
	be.PutUint32(c.whdr[20:], uint32(errno))
	be.PutUint16(c.whdr[24:], uint16(len(msg)))
	c.bw.Write(c.whdr[:26])
	c.bw.WriteString(msg)
}

// replyRead answers a successful READ with its data. With structured
// replies, an all-zero result is sent as a hole (12 bytes instead of the
// data) unless the client asked for one unfragmented data chunk.
func (c *conn) replyRead(r *request, data []byte) {
	c.lockW()
	defer c.unlockW()
	if !c.structured {
		putSimpleReply(c.whdr[:], 0, r.handle)
		c.bw.Write(c.whdr[:simpleReplyLen])
		c.bw.Write(data)
		return
	}
	if len(data) == 0 {
		putChunkHeader(c.whdr[:], replyFlagDone, chunkNone, r.handle, 0)
		c.bw.Write(c.whdr[:structReplyLen])
		return
	}
	if r.flags&cflagDF == 0 && len(data) >= 4096 && isZero(data) {
		putChunkHeader(c.whdr[:], replyFlagDone, chunkOffsetHole, r.handle, 12)
		be.PutUint64(c.whdr[20:], r.off)
		be.PutUint32(c.whdr[28:], uint32(len(data)))
		c.bw.Write(c.whdr[:32])
		return
	}
	putChunkHeader(c.whdr[:], replyFlagDone, chunkOffsetData, r.handle, uint32(8+len(data)))
	be.PutUint64(c.whdr[20:], r.off)
	c.bw.Write(c.whdr[:28])
	c.bw.Write(data)
}

// replyBlockStatus sends one BLOCK_STATUS chunk; payload holds the context
// id and the descriptors.
func (c *conn) replyBlockStatus(r *request, payload []byte) {
	c.lockW()
	defer c.unlockW()
	putChunkHeader(c.whdr[:], replyFlagDone, chunkBlockStatus, r.handle, uint32(len(payload)))
	c.bw.Write(c.whdr[:structReplyLen])
	c.bw.Write(payload)
}
