package nbd

// A byte-level client for testing the server against the spec, including
// with input no well-behaved client would send.

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type raw struct {
	t  *testing.T
	nc net.Conn
}

func dialRaw(t *testing.T, ts *testServer) *raw {
	t.Helper()
	nc, err := net.Dial(ts.addr.Network(), ts.addr.String())
	require.NoError(t, err)
	// A deadline so that a server that fails to answer fails the test
	// instead of hanging it.
	require.NoError(t, nc.SetDeadline(time.Now().Add(20*time.Second)))
	t.Cleanup(func() { nc.Close() })
	return &raw{t: t, nc: nc}
}

func (r *raw) write(parts ...[]byte) {
	r.t.Helper()
	for _, p := range parts {
		_, err := r.nc.Write(p)
		require.NoError(r.t, err)
	}
}

func (r *raw) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	_, err := io.ReadFull(r.nc, b)
	require.NoError(r.t, err)
	return b
}

// expectClosed checks that the server closes the connection (after
// whatever it still had to say, which is skipped).
func (r *raw) expectClosed() {
	r.t.Helper()
	_, err := io.Copy(io.Discard, r.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		r.t.Fatal("server did not close the connection")
	}
}

// greet reads the greeting and sends client flags.
func (r *raw) greet(flags uint32) {
	r.t.Helper()
	g := r.read(greetingLen)
	require.Equal(r.t, magicInit, binary.BigEndian.Uint64(g))
	require.Equal(r.t, magicOpt, binary.BigEndian.Uint64(g[8:]))
	require.Equal(r.t, flagFixedNewstyle|flagNoZeroes, binary.BigEndian.Uint16(g[16:]))
	r.write(be.AppendUint32(nil, flags))
}

func (r *raw) opt(opt uint32, data []byte) {
	r.t.Helper()
	h := be.AppendUint64(nil, magicOpt)
	h = be.AppendUint32(h, opt)
	h = be.AppendUint32(h, uint32(len(data)))
	r.write(h, data)
}

type optReply struct {
	typ  uint32
	data []byte
}

func (r *raw) reply(opt uint32) optReply {
	r.t.Helper()
	h := r.read(optReplyLen)
	require.Equal(r.t, magicOptReply, be.Uint64(h))
	require.Equal(r.t, opt, be.Uint32(h[8:]))
	return optReply{typ: be.Uint32(h[12:]), data: r.read(int(be.Uint32(h[16:])))}
}

// replies reads replies up to and including the final one (ACK or error).
func (r *raw) replies(opt uint32) []optReply {
	r.t.Helper()
	var out []optReply
	for {
		rep := r.reply(opt)
		out = append(out, rep)
		if rep.typ == repAck || rep.typ&(1<<31) != 0 {
			return out
		}
	}
}

func infoData(name string, items ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(items)))
	for _, it := range items {
		b = be.AppendUint16(b, it)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// session negotiates into transmission with NBD_OPT_GO, optionally with
// structured replies and base:allocation, and returns the transmission
// flags.
func (r *raw) session(name string, structured, meta bool) uint16 {
	r.t.Helper()
	r.greet(cflagFixedNewstyle | cflagNoZeroes)
	if structured {
		r.opt(optStructuredReply, nil)
		require.Equal(r.t, repAck, r.reply(optStructuredReply).typ)
	}
	if meta {
		r.opt(optSetMetaContext, metaData(name, metaBaseAllocation))
		reps := r.replies(optSetMetaContext)
		require.Len(r.t, reps, 2)
		require.Equal(r.t, repMetaContext, reps[0].typ)
	}
	r.opt(optGo, infoData(name, infoBlockSize))
	var flags uint16
	for _, rep := range r.replies(optGo) {
		require.Contains(r.t, []uint32{repInfo, repAck}, rep.typ, "reply %#x", rep.typ)
		if rep.typ == repInfo && be.Uint16(rep.data) == infoExport {
			flags = be.Uint16(rep.data[10:])
		}
	}
	return flags
}

func (r *raw) req(flags, typ uint16, handle, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	b := make([]byte, requestLen)
	encodeRequest(b, request{flags: flags, typ: typ, handle: handle, off: off, length: length})
	r.write(b, payload)
}

// simple reads a simple reply.
func (r *raw) simple() (Errno, uint64) {
	r.t.Helper()
	h := r.read(simpleReplyLen)
	require.Equal(r.t, magicSimple, be.Uint32(h), "simple reply magic")
	return Errno(be.Uint32(h[4:])), be.Uint64(h[8:])
}

type chunk struct {
	flags, typ uint16
	handle     uint64
	payload    []byte
}

// anyReply reads a simple reply or a structured chunk.
func (r *raw) anyReply() chunk {
	r.t.Helper()
	m := r.read(4)
	switch be.Uint32(m) {
	case magicSimple:
		h := r.read(simpleReplyLen - 4)
		return chunk{flags: replyFlagDone, typ: 0xffff, handle: be.Uint64(h[4:]), payload: h[:4]}
	case magicStructured:
		h := r.read(structReplyLen - 4)
		return chunk{flags: be.Uint16(h), typ: be.Uint16(h[2:]), handle: be.Uint64(h[4:]),
			payload: r.read(int(be.Uint32(h[12:])))}
	}
	r.t.Fatalf("bad reply magic %x", m)
	return chunk{}
}

// errnoOfReply returns the error of a reply (simple or structured, DONE).
func errnoOfReply(t *testing.T, c chunk) Errno {
	t.Helper()
	require.NotZero(t, c.flags&replyFlagDone, "final chunk")
	switch {
	case c.typ == 0xffff:
		return Errno(be.Uint32(c.payload))
	case c.typ&chunkErrorBit != 0:
		return Errno(be.Uint32(c.payload))
	}
	return 0
}
