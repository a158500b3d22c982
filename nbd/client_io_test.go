package nbd

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// scriptConn is a net.Conn whose reads the test scripts: each Read returns
// what the test sent on in, and Close does not end them (the bytes may
// already sit in the reader's buffer); only closing in does. A Read that
// has nothing to return offers a token on idle, so the test can wait
// until the reader has consumed everything and blocks. Writes go to wrote.
type scriptConn struct {
	in    chan []byte
	idle  chan struct{}
	wrote chan []byte

	rest []byte // the reader's own

	mu     sync.Mutex
	closed bool
}

func newScriptConn() *scriptConn {
	return &scriptConn{in: make(chan []byte), idle: make(chan struct{}), wrote: make(chan []byte, 16)}
}

func (c *scriptConn) Read(p []byte) (int, error) {
	for len(c.rest) == 0 {
		select {
		case b, ok := <-c.in:
			if !ok {
				return 0, net.ErrClosed
			}
			c.rest = b
		case c.idle <- struct{}{}:
		}
	}
	n := copy(p, c.rest)
	c.rest = c.rest[n:]
	return n, nil
}

func (c *scriptConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	c.wrote <- bytes.Clone(p)
	return len(p), nil
}

func (c *scriptConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *scriptConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (*scriptConn) LocalAddr() net.Addr                { return &net.UnixAddr{Name: "client", Net: "unix"} }
func (*scriptConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Name: "server", Net: "unix"} }
func (*scriptConn) SetDeadline(t time.Time) error      { return nil }
func (*scriptConn) SetReadDeadline(t time.Time) error  { return nil }
func (*scriptConn) SetWriteDeadline(t time.Time) error { return nil }

// testClient is a one-lane client over nc as if it had negotiated a
// structured-reply export of 1 MiB; it skips the handshake.
func testClient(t *testing.T, nc net.Conn) (*Client, *lane) {
	t.Helper()
	l := &lane{
		nc:         nc,
		br:         bufio.NewReaderSize(nc, 64<<10),
		bw:         bufio.NewWriterSize(nc, 64<<10),
		pending:    make(map[uint64]*call),
		readerDone: make(chan struct{}),
	}
	l.info = ExportInfo{Name: "test", Size: 1 << 20, BlockSize: 512, MaxRequest: 64 << 10, Structured: true, Connections: 1}
	go l.readReplies()
	return &Client{info: l.info, lanes: []*lane{l}}, l
}

// A connection that fails while the reader is reading a READ's data
// chunk into the caller's buffer (a sender's flush failed, or Close gave
// up waiting) must not complete the call twice: the reader owns it until
// it has the payload. ReadAt returns an error, the buffer is not written
// after it returned, the lane's load goes back to 0, and the call goes
// back to the pool without a stray token in done (which would make the
// next READ that gets the call object return at once, its buffer unfilled).
func TestClientFailDuringChunkPayload(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags uint16
	}{
		{"last chunk", replyFlagDone},
		{"more chunks to come", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nc := newScriptConn()
			c, l := testClient(t, nc)
			const n = 4096
			buf := make([]byte, n)
			type result struct {
				err  error
				snap []byte // buf as ReadAt returned it
			}
			res := make(chan result, 1)
			go func() {
				_, err := c.ReadAt(buf, 0)
				res <- result{err, bytes.Clone(buf)}
			}()
			req, ok := decodeRequest(<-nc.wrote)
			require.True(t, ok)
			require.Equal(t, cmdRead, req.typ)
			l.mu.Lock()
			cl := l.pending[req.handle]
			l.mu.Unlock()
			require.NotNil(t, cl)

			// The chunk header and its offset arrive; the data does not yet.
			hdr := make([]byte, structReplyLen+8)
			putChunkHeader(hdr, tc.flags, chunkOffsetData, req.handle, 8+n)
			be.PutUint64(hdr[structReplyLen:], 0)
			send := func(b []byte) {
				select {
				case nc.in <- b:
				case <-l.readerDone:
					t.Fatal("the reader stopped early")
				}
			}
			send(hdr)
			// The reader holds the destination and waits for the data.
			select {
			case <-nc.idle:
			case <-l.readerDone:
				t.Fatal("the reader stopped early")
			}
			l.fail(errors.New("injected send failure"))
			require.True(t, nc.isClosed())
			// The data was already buffered: the reader gets it anyway.
			send(bytes.Repeat([]byte{0xaa}, n))
			close(nc.in)
			<-l.readerDone

			r := <-res
			assert.Error(t, r.err)
			assert.True(t, bytes.Equal(r.snap, buf), "the buffer was written after ReadAt returned")
			assert.Zero(t, l.load.Load(), "lane load")
			assert.Zero(t, len(cl.done), "a stray completion token in a pooled call")
			require.NoError(t, c.Close())
		})
	}
}

// Close sends NBD_CMD_DISC as a courtesy; a server that stopped reading
// (its receive buffer full) must not make Close block forever.
func TestClientCloseServerNotReading(t *testing.T) {
	old := discWait
	discWait = 10 * time.Millisecond
	t.Cleanup(func() { discWait = old })
	cnc, snc := net.Pipe() // no buffer: a write waits for the peer to read
	defer snc.Close()
	c, l := testClient(t, cnc)
	done := make(chan error, 1)
	go func() { done <- c.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(time.Minute):
		snc.Close() // ends the DISC write, and with it Close
		<-done
		t.Fatal("Close blocked sending NBD_CMD_DISC to a server that does not read")
	}
	<-l.readerDone
}
