package nbd

// Fuzz targets for the option parser (the whole negotiation, and on into
// transmission) and the request parser. Their seeds run as unit tests;
// `go test -fuzz FuzzHandshake ./nbd` explores further.

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// clientStream builds what a client sends: a greeting answer, options, and
// requests.
type clientStream struct{ bytes.Buffer }

func (s *clientStream) flags(f uint32) *clientStream {
	s.Write(be.AppendUint32(nil, f))
	return s
}

func (s *clientStream) opt(opt uint32, data []byte) *clientStream {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	s.Write(append(b, data...))
	return s
}

func (s *clientStream) req(flags, typ uint16, off uint64, length uint32, payload []byte) *clientStream {
	b := make([]byte, requestLen)
	encodeRequest(b, request{flags: flags, typ: typ, handle: uint64(s.Len()), off: off, length: length})
	s.Write(append(b, payload...))
	return s
}

// requests appends one of each command (and some bad ones). With payloads
// false the writes carry none: FuzzRequest's inputs are compact and
// expandWrites adds them.
func (s *clientStream) requests(payloads bool) *clientStream {
	payload := func(b byte) []byte {
		if !payloads {
			return nil
		}
		return bytes.Repeat([]byte{b}, 512)
	}
	return s.req(0, cmdWrite, 0, 512, payload(1)).
		req(0, cmdRead, 0, 4096, nil).
		req(cflagDF, cmdRead, 4096, 512, nil).
		req(cflagFUA, cmdWrite, 512, 512, payload(0)).
		req(0, cmdFlush, 0, 0, nil).
		req(0, cmdTrim, 0, 512, nil).
		req(cflagNoHole|cflagFastZero, cmdWriteZeroes, 0, 1024, nil).
		req(0, cmdWriteZeroes, 1024, 1024, nil).
		req(cflagReqOne, cmdBlockStatus, 0, 65536, nil).
		req(0, cmdBlockStatus, 0, 65536, nil).
		req(0, cmdCache, 0, 65536, nil).
		req(0, 77, 0, 0, nil).
		req(0, cmdRead, 1<<40, 512, nil).
		req(0, cmdDisc, 0, 0, nil)
}

// readOnlyRequests appends the commands that carry no payload, for the
// handshake seeds: their transmission phase stays short.
func (s *clientStream) readOnlyRequests() *clientStream {
	return s.req(0, cmdRead, 0, 4096, nil).
		req(0, cmdFlush, 0, 0, nil).
		req(0, cmdTrim, 0, 512, nil).
		req(cflagReqOne, cmdBlockStatus, 0, 65536, nil).
		req(0, cmdDisc, 0, 0, nil)
}

// expandWrites turns a compact request stream into what a client sends:
// after each write request header it inserts the payload (a pattern, up to
// 8 KiB of the request's length: a longer write is cut short, as a client
// that hung up would). Inputs stay small, and so does the work
// Go's engine spends minimising each new one (it grows with the square of
// the input's length; 512-byte payloads in the seeds made FuzzRequest spend
// its time minimising).
func expandWrites(in []byte) []byte {
	out := make([]byte, 0, len(in))
	for len(in) >= requestLen {
		out = append(out, in[:requestLen]...)
		if r, ok := decodeRequest(in); ok && r.typ == cmdWrite {
			for i := range min(r.length, 8<<10) {
				out = append(out, byte(i)|1)
			}
		}
		in = in[requestLen:]
	}
	return append(out, in...)
}

func handshakeSeeds() [][]byte {
	var seeds [][]byte
	full := new(clientStream).flags(cflagFixedNewstyle|cflagNoZeroes).
		opt(optStructuredReply, nil).
		opt(optSetMetaContext, metaData("d", metaBaseAllocation)).
		opt(optGo, infoData("d", infoBlockSize, infoName)).readOnlyRequests()
	seeds = append(seeds, full.Bytes())
	seeds = append(seeds, new(clientStream).flags(cflagFixedNewstyle).
		opt(optList, nil).opt(optInfo, infoData("", infoDescription)).
		opt(optListMetaContext, metaData("d")).opt(99, []byte("x")).
		opt(optExportName, []byte("d")).readOnlyRequests().Bytes())
	seeds = append(seeds, new(clientStream).flags(0).opt(optAbort, nil).Bytes())
	seeds = append(seeds, new(clientStream).flags(cflagFixedNewstyle).opt(optStartTLS, nil).
		opt(optGo, infoData("nope")).opt(optGo, []byte{0, 0, 0, 1}).Bytes())
	seeds = append(seeds, full.Bytes()[:50], nil, []byte{0, 0, 0, 3, 0xff})
	return seeds
}

// streamConn is a net.Conn whose reads come from a fixed input, ending
// in EOF (a client that sent everything and half-closed), and whose
// writes are collected.
type streamConn struct {
	in     *bytes.Reader
	mu     sync.Mutex
	out    bytes.Buffer
	closed bool
}

func (s *streamConn) Read(p []byte) (int, error) { return s.in.Read(p) }

func (s *streamConn) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, net.ErrClosed
	}
	return s.out.Write(p)
}

func (s *streamConn) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

func (s *streamConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (s *streamConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (s *streamConn) SetDeadline(time.Time) error      { return nil }
func (s *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (s *streamConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzServer is one server, over one device, for every input of a fuzz
// target: a server and a device set up per input were most of what an input
// cost. The connection runs over streamConn, in memory, never a socket.
type fuzzServer struct {
	srv *Server
	dev *blockdev.Mem
}

func newFuzzServer(f *testing.F) *fuzzServer {
	dev := blockdevtest.NewMem(f, 1<<20, 512)
	srv, err := New(Options{Workers: 2, MaxInFlight: 4},
		Export{Name: "d", Description: "fuzz", Device: dev})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = srv.Close() })
	return &fuzzServer{srv: srv, dev: dev}
}

// serve runs one server connection over the input and returns what the
// server said; the device is zeroed again after, so inputs do not depend on
// each other. A hang fails by the test binary's timeout, a panic fails at
// once.
func (fs *fuzzServer) serve(t *testing.T, in []byte, setup func(c *conn)) []byte {
	sc := &streamConn{in: bytes.NewReader(in)}
	c := newConn(fs.srv, sc)
	func() {
		defer c.kill()
		if setup == nil {
			c.serve()
			return
		}
		setup(c)
		c.transmit()
	}()
	require.NoError(t, fs.dev.Discard(0, fs.dev.Size()))
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.out.Bytes()
}

func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	fs := newFuzzServer(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		out := fs.serve(t, in, nil)
		if len(out) < greetingLen || be.Uint64(out) != magicInit {
			t.Fatalf("no greeting: %x", out)
		}
	})
}

func FuzzRequest(f *testing.F) {
	for _, structured := range []byte{0, 1} {
		f.Add(append([]byte{structured}, new(clientStream).requests(false).Bytes()...))
	}
	f.Add([]byte{1, 0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1})
	f.Add([]byte{0})
	fs := newFuzzServer(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		// The header decoder round-trips whatever it accepts.
		if r, ok := decodeRequest(in[1:]); ok {
			b := make([]byte, requestLen)
			encodeRequest(b, r)
			require.Equal(t, in[1:1+requestLen], b)
		}
		structured := in[0]&1 != 0
		out := fs.serve(t, expandWrites(in[1:]), func(c *conn) {
			c.structured = structured
			c.meta = in[0]&2 != 0
			x := c.srv.lookup("")
			c.selectExport(x, x.ro)
			c.exp = x
		})
		if structured {
			checkReplyFraming(t, out)
		}
	})
}

// checkReplyFraming walks a stream of replies in which every message is
// self-describing (structured replies negotiated, so no simple reply
// carries data) and fails on anything that is not a reply.
func checkReplyFraming(t *testing.T, out []byte) {
	for len(out) > 0 {
		if len(out) < 4 {
			t.Fatalf("trailing %d bytes", len(out))
		}
		switch be.Uint32(out) {
		case magicSimple:
			if len(out) < simpleReplyLen {
				t.Fatalf("short simple reply")
			}
			out = out[simpleReplyLen:]
		case magicStructured:
			if len(out) < structReplyLen {
				t.Fatalf("short chunk header")
			}
			n := int(be.Uint32(out[16:]))
			if be.Uint16(out[4:])&^replyFlagDone != 0 {
				t.Fatalf("unknown reply flags %#x", be.Uint16(out[4:]))
			}
			if structReplyLen+n > len(out) {
				t.Fatalf("chunk of %d bytes, %d left", n, len(out)-structReplyLen)
			}
			out = out[structReplyLen+n:]
		default:
			t.Fatalf("bad reply magic %x", out[:4])
		}
	}
}
