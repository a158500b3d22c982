package nbd

import (
	"context"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/stretchr/testify/require"
)

func handshakeServer(t *testing.T) *testServer {
	return startServer(t, Options{},
		Export{Name: "one", Description: "the first", Device: blockdevtest.NewMem(t, 1<<20, 512)},
		Export{Name: "two", Device: blockdevtest.NewMem(t, 2<<20, 4096), ReadOnly: true})
}

func TestHandshakeUnknownClientFlags(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle | 1<<5)
	r.expectClosed()
}

func TestHandshakeBadOptionMagic(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	h := be.AppendUint64(nil, magicOpt^1)
	h = be.AppendUint32(h, optList)
	h = be.AppendUint32(h, 0)
	r.write(h)
	r.expectClosed()
}

func TestHandshakeTruncatedOption(t *testing.T) {
	for _, cut := range []int{3, 8, 12, 15, 16 + 3} {
		r := dialRaw(t, handshakeServer(t))
		r.greet(cflagFixedNewstyle)
		h := be.AppendUint64(nil, magicOpt)
		h = be.AppendUint32(h, optGo)
		h = be.AppendUint32(h, 10)
		h = append(h, infoData("one")...)
		r.write(h[:cut])
		require.NoError(t, r.nc.(interface{ CloseWrite() error }).CloseWrite())
		r.expectClosed()
	}
}

func TestHandshakeOversizedOption(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	h := be.AppendUint64(nil, magicOpt)
	h = be.AppendUint32(h, 99)
	h = be.AppendUint32(h, maxOptionData+1)
	r.write(h)
	r.expectClosed()
}

func TestHandshakeUnknownOptions(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	for _, opt := range []uint32{99, optPeekExport, optExtendedHeaders, 0, 1 << 31} {
		r.opt(opt, []byte("some data the server must skip"))
		require.Equal(t, repErrUnsup, r.reply(opt).typ, "option %d", opt)
	}
	// With TLS off, STARTTLS is refused by policy (the protocol's NOTLS
	// mode).
	r.opt(optStartTLS, nil)
	require.Equal(t, repErrPolicy, r.reply(optStartTLS).typ)
	// The session is still usable.
	r.opt(optList, nil)
	require.Len(t, r.replies(optList), 3)
}

func TestHandshakeList(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	r.opt(optList, nil)
	reps := r.replies(optList)
	require.Len(t, reps, 3)
	require.Equal(t, repServer, reps[0].typ)
	require.Equal(t, uint32(3), be.Uint32(reps[0].data))
	require.Equal(t, "onethe first", string(reps[0].data[4:]))
	require.Equal(t, "two", string(reps[1].data[4:]))
	require.Equal(t, repAck, reps[2].typ)

	r.opt(optList, []byte{1})
	require.Equal(t, repErrInvalid, r.reply(optList).typ)
}

func TestHandshakeInfo(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle | cflagNoZeroes)

	r.opt(optInfo, infoData("nope"))
	require.Equal(t, []optReply{{typ: repErrUnknown, data: []byte("no such export")}}, r.replies(optInfo))

	for _, bad := range [][]byte{
		nil, {0, 0, 0}, // too short
		be.AppendUint32(nil, 100),                      // name longer than the data
		append(infoData("one", infoName), 0),           // trailing byte
		infoData("one", infoName)[:len("one")+4+2+1],   // truncated request list
		append(be.AppendUint32(nil, 0xffffffff), 0, 0), // huge name length
	} {
		r.opt(optInfo, bad)
		require.Equal(t, repErrInvalid, r.reply(optInfo).typ, "data %x", bad)
	}

	// The empty name is the default export, the first one.
	r.opt(optInfo, infoData("", infoName, infoDescription, infoBlockSize, 999))
	got := map[uint16][]byte{}
	for _, rep := range r.replies(optInfo) {
		if rep.typ == repInfo {
			got[be.Uint16(rep.data)] = rep.data[2:]
		} else {
			require.Equal(t, repAck, rep.typ)
		}
	}
	require.Len(t, got, 4)
	require.Equal(t, uint64(1<<20), be.Uint64(got[infoExport]))
	flags := be.Uint16(got[infoExport][8:])
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagWriteZeroes |
		tflagSendFastZero | tflagMultiConn | tflagSendCache
	require.Equal(t, want, flags, "flags %#x", flags)
	require.Equal(t, "one", string(got[infoName]))
	require.Equal(t, "the first", string(got[infoDescription]))
	require.Equal(t, []uint32{1, 512, MaxRequest},
		[]uint32{be.Uint32(got[infoBlockSize]), be.Uint32(got[infoBlockSize][4:]), be.Uint32(got[infoBlockSize][8:])})

	// INFO does not end negotiation; a read-only export says so, and with
	// structured replies DF is offered.
	r.opt(optStructuredReply, nil)
	require.Equal(t, repAck, r.reply(optStructuredReply).typ)
	r.opt(optGo, infoData("two"))
	for _, rep := range r.replies(optGo) {
		if rep.typ == repInfo && be.Uint16(rep.data) == infoExport {
			require.Equal(t, uint64(2<<20), be.Uint64(rep.data[2:]))
			require.Equal(t, tflagHasFlags|tflagReadOnly|tflagSendFlush|tflagMultiConn|tflagSendCache|tflagSendDF,
				be.Uint16(rep.data[10:]))
		}
	}
	// In transmission now: a read works.
	r.req(0, cmdRead, 7, 0, 4096, nil)
	c := r.anyReply()
	require.Equal(t, uint64(7), c.handle)
	require.Equal(t, Errno(0), errnoOfReply(t, c))
}

func TestHandshakeExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		r := dialRaw(t, handshakeServer(t))
		flags := cflagFixedNewstyle
		if noZeroes {
			flags |= cflagNoZeroes
		}
		r.greet(flags)
		r.opt(optExportName, []byte("two"))
		b := r.read(10)
		require.Equal(t, uint64(2<<20), be.Uint64(b))
		require.NotZero(t, be.Uint16(b[8:])&tflagReadOnly)
		if !noZeroes {
			require.Equal(t, make([]byte, 124), r.read(124))
		}
		r.req(0, cmdRead, 1, 0, 4096, nil)
		errno, handle := r.simple()
		require.Equal(t, Errno(0), errno)
		require.Equal(t, uint64(1), handle)
		require.Equal(t, make([]byte, 4096), r.read(4096))
	}
	// An unknown name cannot be refused politely: the server hangs up.
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	r.opt(optExportName, []byte("nope"))
	r.expectClosed()
}

func TestHandshakeAbort(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	r.opt(optAbort, []byte("ignored"))
	require.Equal(t, repAck, r.reply(optAbort).typ)
	r.expectClosed()
}

func TestHandshakeStructuredReply(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	r.opt(optStructuredReply, []byte{1})
	require.Equal(t, repErrInvalid, r.reply(optStructuredReply).typ)
	r.opt(optStructuredReply, nil)
	require.Equal(t, repAck, r.reply(optStructuredReply).typ)
	r.opt(optStructuredReply, nil)
	require.Equal(t, repErrInvalid, r.reply(optStructuredReply).typ)
}

func TestHandshakeMetaContext(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	// Before structured replies: refused.
	r.opt(optSetMetaContext, metaData("one", metaBaseAllocation))
	require.Equal(t, repErrInvalid, r.reply(optSetMetaContext).typ)
	r.opt(optStructuredReply, nil)
	require.Equal(t, repAck, r.reply(optStructuredReply).typ)

	names := func(reps []optReply) []string {
		var out []string
		for _, rep := range reps {
			if rep.typ == repMetaContext {
				out = append(out, string(rep.data[4:]))
			}
		}
		require.Equal(t, repAck, reps[len(reps)-1].typ)
		return out
	}
	for _, tc := range []struct {
		opt     uint32
		queries []string
		want    []string
	}{
		{optListMetaContext, nil, []string{metaBaseAllocation}},
		{optListMetaContext, []string{"base:"}, []string{metaBaseAllocation}},
		{optListMetaContext, []string{"qemu:dirty-bitmap:x"}, nil},
		{optListMetaContext, []string{"base:other"}, nil},
		{optSetMetaContext, nil, nil},
		{optSetMetaContext, []string{"base:"}, nil},
		{optSetMetaContext, []string{"x-foo:bar", metaBaseAllocation}, []string{metaBaseAllocation}},
	} {
		r.opt(tc.opt, metaData("one", tc.queries...))
		require.Equal(t, tc.want, names(r.replies(tc.opt)), "%d %q", tc.opt, tc.queries)
	}
	r.opt(optSetMetaContext, metaData("one", "no-colon"))
	require.Equal(t, repErrInvalid, r.reply(optSetMetaContext).typ)
	r.opt(optListMetaContext, metaData("nope"))
	require.Equal(t, repErrUnknown, r.reply(optListMetaContext).typ)
	bad := metaData("one", metaBaseAllocation)
	r.opt(optSetMetaContext, bad[:len(bad)-1])
	require.Equal(t, repErrInvalid, r.reply(optSetMetaContext).typ)
	huge := be.AppendUint32(metaData("one")[:7], 0xffffffff)
	r.opt(optSetMetaContext, huge)
	require.Equal(t, repErrInvalid, r.reply(optSetMetaContext).typ)

	// The failed SET above cleared the selection: BLOCK_STATUS is refused.
	r.opt(optGo, infoData("one"))
	r.replies(optGo)
	r.req(0, cmdBlockStatus, 1, 0, 4096, nil)
	require.Equal(t, EINVAL, errnoOfReply(t, r.anyReply()))
}

func TestHandshakeMetaContextOtherExport(t *testing.T) {
	r := dialRaw(t, handshakeServer(t))
	r.greet(cflagFixedNewstyle)
	r.opt(optStructuredReply, nil)
	r.reply(optStructuredReply)
	r.opt(optSetMetaContext, metaData("two", metaBaseAllocation))
	require.Len(t, r.replies(optSetMetaContext), 2)
	// GO to another export than the contexts were chosen for.
	r.opt(optGo, infoData("one"))
	r.replies(optGo)
	r.req(0, cmdBlockStatus, 1, 0, 4096, nil)
	require.Equal(t, EINVAL, errnoOfReply(t, r.anyReply()))
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, Options{HandshakeTimeout: 50e6},
		Export{Name: "one", Device: blockdevtest.NewMem(t, 1<<20, 512)})
	r := dialRaw(t, ts)
	r.read(greetingLen)
	// Say nothing: the server gives up on us.
	r.expectClosed()
}

// Remove withdraws an export from new connections and from OPT_LIST; a
// connection already on it keeps working; the name can be added again.
func TestServerRemoveExport(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.uri("one"))
	defer c.Close()
	require.NoError(t, ts.srv.Remove("one"))
	require.ErrorIs(t, ts.srv.Remove("one"), ErrUnknownExport)

	r := dialRaw(t, ts)
	r.greet(cflagFixedNewstyle)
	r.opt(optList, nil)
	reps := r.replies(optList)
	require.Len(t, reps, 2)
	require.Equal(t, "two", string(reps[0].data[4:]))

	_, err := Dial(context.Background(), ts.uri("one"))
	require.ErrorIs(t, err, ErrUnknownExport)
	_, err = c.WriteAt(make([]byte, 512), 0) // the open connection still works
	require.NoError(t, err)

	require.NoError(t, ts.srv.Add(Export{Name: "one", Device: blockdevtest.NewMem(t, 1<<20, 512)}))
	c2 := dial(t, ts.uri("one"))
	require.NoError(t, c2.Close())
}
