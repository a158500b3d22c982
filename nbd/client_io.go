package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// call is one request in flight from the client. Calls are pooled; done
// has room for the one completion each call gets.
//
// Only the lane's reply reader completes calls (see lane.fail): it may be
// writing a reply into buf up to the moment it does, so a completion from
// anywhere else could hand the caller its buffer back while the reader
// still writes into it, and then send the call a second token.
type call struct {
	typ  uint16
	off  uint64
	buf  []byte // READ destination
	got  uint64 // READ bytes delivered by content chunks
	err  error
	done chan struct{}
	// BLOCK_STATUS: the extents of our context (the slice is kept
	// with the pooled call).
	exts     []extent
	extSeen  bool
	finished bool  // done has been received from
	cost     int64 // bytes it adds to its lane's load
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1)} }}

// closeWait bounds how long Close waits for requests in flight.
const closeWait = 30 * time.Second

// discWait bounds the write of NBD_CMD_DISC on Close: a server that stopped
// reading must not hold Close forever.
var discWait = 5 * time.Second

// window is how many split requests one call keeps in flight.
const window = 8

// split runs a READ or WRITE of p at off as requests of at most
// MaxRequest bytes, up to window of them in flight at once.
func (c *Client) split(typ, flags uint16, p []byte, off int64) error {
	var calls [window]*call
	var first error
	for len(p) > 0 || first != nil {
		n := 0
		for ; n < window && len(p) > 0; n++ {
			k := min(len(p), c.info.MaxRequest)
			var payload, rbuf []byte
			if typ == cmdWrite {
				payload = p[:k]
			} else {
				rbuf = p[:k]
			}
			cl, err := c.pick(k).start(typ, flags, uint64(off), uint32(k), payload, rbuf)
			if err != nil {
				first = err
				break
			}
			calls[n] = cl
			p, off = p[k:], off+int64(k)
		}
		for i := 0; i < n; i++ {
			if err := finish(calls[i], commandName(typ), int64(calls[i].off)); err != nil && first == nil {
				first = err
			}
		}
		if first != nil {
			return first
		}
	}
	return nil
}

// roundTrip sends a request without payload and waits for its reply.
func (c *Client) roundTrip(typ, flags uint16, off, n int64) error {
	cl, err := c.pick(0).start(typ, flags, uint64(off), uint32(n), nil, nil)
	if err != nil {
		return err
	}
	return finish(cl, commandName(typ), off)
}

// start registers a call and sends its request.
func (c *lane) start(typ, flags uint16, off uint64, length uint32, payload, rbuf []byte) (*call, error) {
	cl := callPool.Get().(*call)
	cl.typ, cl.off, cl.buf = typ, off, rbuf
	cl.cost = int64(len(payload) + len(rbuf))
	handle := c.handles.Add(1)
	c.mu.Lock()
	if c.err != nil || c.closing {
		err := c.err
		c.mu.Unlock()
		putCall(cl)
		if err == nil {
			err = blockdev.ErrClosed
		}
		return nil, err
	}
	c.pending[handle] = cl
	c.load.Add(cl.cost)
	c.mu.Unlock()

	c.wpending.Add(1)
	c.wmu.Lock()
	encodeRequest(c.whdr[:], request{flags: flags, typ: typ, handle: handle, off: off, length: length})
	c.bw.Write(c.whdr[:])
	c.bw.Write(payload)
	var err error
	if c.wpending.Add(-1) == 0 {
		// The last sender out flushes, so requests issued together
		// leave together.
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("nbd: send: %w", err))
	}
	return cl, nil
}

// finish waits for a call's reply (unless the caller already has) and
// returns the call to the pool.
func finish(cl *call, op string, off int64) error {
	if !cl.finished {
		<-cl.done
	}
	err := cl.err
	putCall(cl)
	if err == nil {
		return nil
	}
	var errno Errno
	if errors.As(err, &errno) {
		return fmt.Errorf("nbd: %s at %d: %w", op, off, err)
	}
	return err
}

func putCall(cl *call) {
	if len(cl.done) != 0 {
		// A stray completion: the next request given this call would
		// return at once with nothing done. Never let it be pooled.
		return
	}
	cl.buf, cl.err, cl.got = nil, nil, 0
	cl.exts, cl.extSeen, cl.finished = cl.exts[:0], false, false
	callPool.Put(cl)
}

// complete hands a call its result. Only the reader calls it, once per
// call, after removing the call from pending under mu.
func (c *lane) complete(cl *call) {
	c.load.Add(-cl.cost)
	cl.done <- struct{}{}
}

// take removes a call from pending once the reader has its whole reply.
// If the lane failed meanwhile, the call gets the lane's error (unless the
// reply carried one): fail promises it to every call in flight.
func (c *lane) take(handle uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.pending[handle]
	delete(c.pending, handle)
	if cl != nil && cl.err == nil && c.err != nil {
		cl.err = c.err
	}
	c.noteDrained()
	return cl
}

// noteDrained closes drained once Close waits and nothing is in flight.
// Called with mu held.
func (c *lane) noteDrained() {
	if c.closing && c.drained != nil && len(c.pending) == 0 {
		select {
		case <-c.drained:
		default:
			close(c.drained)
		}
	}
}

// fail breaks the connection: every call in flight, and every later one,
// gets err (or the error of an earlier fail). It records err and closes
// the socket; it completes no call itself. The reader may be reading a
// reply into a caller's buffer, even to its end from what it has
// buffered, so the reader completes the calls: a reply it finishes gets
// the error in take, and when its next read fails it completes every call
// still pending.
func (c *lane) fail(err error) {
	c.mu.Lock()
	first := c.err == nil
	if first {
		c.err = err
		c.broken.Store(true)
	}
	c.mu.Unlock()
	if first {
		c.nc.Close()
	}
}

// readReplies is the reply reader: it matches replies to calls by handle
// and reads READ data straight into the caller's buffer. It is the only
// goroutine that removes calls from pending and completes them.
func (c *lane) readReplies() {
	defer close(c.readerDone)
	var err error
	for err == nil {
		err = c.readReply()
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
		err = fmt.Errorf("nbd: connection closed: %w", err)
	}
	c.fail(err)
	c.mu.Lock()
	err = c.err // the first failure's
	calls := c.pending
	c.pending = make(map[uint64]*call)
	c.noteDrained()
	c.mu.Unlock()
	for _, cl := range calls {
		cl.err = err
		c.complete(cl)
	}
}

func (c *lane) readReply() error {
	h := c.rhdr[:structReplyLen]
	if err := readFull(c.br, h[:4]); err != nil {
		return err
	}
	switch be.Uint32(h[:]) {
	case magicSimple:
		if err := readFull(c.br, h[4:simpleReplyLen]); err != nil {
			return err
		}
		return c.simpleReply(Errno(be.Uint32(h[4:])), be.Uint64(h[8:]))
	case magicStructured:
		if err := readFull(c.br, h[4:structReplyLen]); err != nil {
			return err
		}
		return c.chunk(be.Uint16(h[4:]), be.Uint16(h[6:]), be.Uint64(h[8:]), be.Uint32(h[16:]))
	}
	return fmt.Errorf("%w: bad reply magic %#x", ErrProtocol, be.Uint32(h[:]))
}

// simpleReply reads a simple reply's data (a READ's) into the call's
// buffer while the call is still pending, then takes and completes it. If
// the read fails, the call stays pending and readReplies completes it.
func (c *lane) simpleReply(errno Errno, handle uint64) error {
	cl := c.peek(handle)
	if cl == nil {
		return fmt.Errorf("%w: reply for unknown handle %d", ErrProtocol, handle)
	}
	if errno != 0 {
		cl.err = errno
	} else if cl.typ == cmdRead {
		if err := readFull(c.br, cl.buf); err != nil {
			return err
		}
	}
	if c.take(handle) == cl {
		c.complete(cl)
	}
	return nil
}

// peek finds a call without removing it: the reader reads a reply into
// the call while it is pending, and takes it once the reply is whole
// (structured replies may take several chunks).
func (c *lane) peek(handle uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[handle]
}

// maxChunkMeta bounds the payload of non-data chunks (block status,
// errors) the client reads.
const maxChunkMeta = 1 << 20

func (c *lane) chunk(flags, typ uint16, handle uint64, n uint32) error {
	cl := c.peek(handle)
	if cl == nil {
		return fmt.Errorf("%w: chunk for unknown handle %d", ErrProtocol, handle)
	}
	if err := c.chunkPayload(cl, typ, n); err != nil {
		return err // cl stays pending: readReplies completes it
	}
	if flags&replyFlagDone == 0 {
		return nil
	}
	if cl.err == nil && cl.typ == cmdRead && cl.got != uint64(len(cl.buf)) {
		cl.err = fmt.Errorf("%w: read reply covered %d of %d bytes", ErrProtocol, cl.got, len(cl.buf))
	}
	if cl.err == nil && cl.typ == cmdBlockStatus && !cl.extSeen {
		cl.err = fmt.Errorf("%w: block status reply without our context", ErrProtocol)
	}
	if c.take(handle) == cl {
		c.complete(cl)
	}
	return nil
}

// chunkPayload reads and applies one chunk's payload.
func (c *lane) chunkPayload(cl *call, typ uint16, n uint32) error {
	switch {
	case typ == chunkNone:
		if n != 0 {
			return fmt.Errorf("%w: NONE chunk with payload", ErrProtocol)
		}
		return nil
	case typ == chunkOffsetData && cl.typ == cmdRead:
		if n < 9 {
			return fmt.Errorf("%w: data chunk of %d bytes", ErrProtocol, n)
		}
		b := c.rhdr[structReplyLen : structReplyLen+8]
		if err := readFull(c.br, b); err != nil {
			return err
		}
		dst, err := cl.span(be.Uint64(b), uint64(n-8))
		if err != nil {
			return err
		}
		cl.got += uint64(len(dst))
		return readFull(c.br, dst)
	case typ == chunkOffsetHole && cl.typ == cmdRead:
		if n != 12 {
			return fmt.Errorf("%w: hole chunk of %d bytes", ErrProtocol, n)
		}
		b := c.rhdr[structReplyLen : structReplyLen+12]
		if err := readFull(c.br, b); err != nil {
			return err
		}
		dst, err := cl.span(be.Uint64(b), uint64(be.Uint32(b[8:])))
		if err != nil {
			return err
		}
		clear(dst)
		cl.got += uint64(len(dst))
		return nil
	}
	if n > maxChunkMeta {
		return fmt.Errorf("%w: chunk type %d of %d bytes", ErrProtocol, typ, n)
	}
	p := getBuf(int(n))
	defer putBuf(p)
	b := (*p)[:n]
	if err := readFull(c.br, b); err != nil {
		return err
	}
	switch {
	case typ == chunkBlockStatus && cl.typ == cmdBlockStatus:
		if n < 12 || (n-4)%8 != 0 {
			return fmt.Errorf("%w: block status chunk of %d bytes", ErrProtocol, n)
		}
		if be.Uint32(b) == c.metaID && !cl.extSeen {
			cl.extSeen = true
			for d := b[4:]; len(d) >= 8 && len(cl.exts) < maxKeptExtents; d = d[8:] {
				e := extent{n: int64(be.Uint32(d)), flags: be.Uint32(d[4:])}
				if e.n == 0 {
					return fmt.Errorf("%w: block status extent of length 0", ErrProtocol)
				}
				cl.exts = append(cl.exts, e)
			}
		}
		return nil
	case typ&chunkErrorBit != 0:
		if n < 6 || int(be.Uint16(b[4:])) > int(n)-6 {
			return fmt.Errorf("%w: error chunk of %d bytes", ErrProtocol, n)
		}
		errno := Errno(be.Uint32(b))
		if errno == 0 {
			errno = EINVAL // the spec: treat unexpected values as EINVAL
		}
		if cl.err == nil {
			msg := string(b[6 : 6+be.Uint16(b[4:])])
			cl.err = &remoteError{errno: errno, msg: msg}
		}
		return nil
	}
	return fmt.Errorf("%w: unexpected chunk type %d for %s", ErrProtocol, typ, commandName(cl.typ))
}

// span returns the part of a READ's buffer a content chunk covers, after
// checking that it lies within the request.
func (cl *call) span(off, n uint64) ([]byte, error) {
	end := cl.off + uint64(len(cl.buf))
	if n == 0 || off < cl.off || off > end || n > end-off {
		return nil, fmt.Errorf("%w: chunk [%d, +%d) outside read [%d, %d)", ErrProtocol, off, n, cl.off, end)
	}
	return cl.buf[off-cl.off : off-cl.off+n], nil
}

// remoteError is an error chunk: the errno and the server's message.
type remoteError struct {
	errno Errno
	msg   string
}

func (e *remoteError) Error() string {
	if e.msg == "" {
		return e.errno.Error()
	}
	return e.errno.Error() + ": " + e.msg
}

func (e *remoteError) Unwrap() error { return e.errno }
