package nbd

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

const cmdSize = 1 << 20

// cmdSession starts a server exporting dev as "d" and negotiates a
// session (structured with base:allocation, or simple).
func cmdSession(t *testing.T, dev blockdev.Device, ro, structured bool) *raw {
	t.Helper()
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev, ReadOnly: ro})
	r := dialRaw(t, ts)
	r.session("d", structured, structured)
	return r
}

// roundTrip sends a request and returns its (single, final) reply.
func (r *raw) roundTrip(flags, typ uint16, off uint64, length uint32, payload []byte) chunk {
	r.t.Helper()
	r.req(flags, typ, 42, off, length, payload)
	c := r.anyReply()
	require.Equal(r.t, uint64(42), c.handle)
	return c
}

func (r *raw) errno(flags, typ uint16, off uint64, length uint32, payload []byte) Errno {
	r.t.Helper()
	return errnoOfReply(r.t, r.roundTrip(flags, typ, off, length, payload))
}

// readData reads through a session and returns the data (simple replies
// or one data/hole chunk).
func (r *raw) readData(off uint64, n int, structured bool) []byte {
	r.t.Helper()
	r.req(0, cmdRead, 9, off, uint32(n), nil)
	if !structured {
		errno, _ := r.simple()
		require.Equal(r.t, Errno(0), errno)
		return r.read(n)
	}
	c := r.anyReply()
	require.Equal(r.t, replyFlagDone, c.flags)
	require.Equal(r.t, off, be.Uint64(c.payload))
	switch c.typ {
	case chunkOffsetData:
		return c.payload[8:]
	case chunkOffsetHole:
		require.Equal(r.t, uint32(n), be.Uint32(c.payload[8:]))
		return make([]byte, n)
	}
	r.t.Fatalf("read reply chunk type %d", c.typ)
	return nil
}

func TestCommandsReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		dev := &counting{Device: blockdevtest.NewMem(t, cmdSize, 512)}
		r := cmdSession(t, dev, false, structured)
		p := bytes.Repeat([]byte{0x5a}, 8192)
		require.Equal(t, Errno(0), r.errno(0, cmdWrite, 4096, 8192, p))
		require.Equal(t, p, r.readData(4096, 8192, structured))
		require.Equal(t, make([]byte, 4096), r.readData(0, 4096, structured))
		// FUA reaches the device as FUA.
		require.Equal(t, Errno(0), r.errno(cflagFUA, cmdWrite, 0, 512, p[:512]))
		require.Equal(t, int64(1), dev.n(opFUA))
		// Zero lengths are harmless.
		require.Equal(t, Errno(0), r.errno(0, cmdWrite, 0, 0, nil))
		if structured {
			c := r.roundTrip(0, cmdRead, 0, 0, nil)
			require.Equal(t, chunkNone, c.typ)
		}
		// DF: one data chunk, zeros spelled out.
		if structured {
			c := r.roundTrip(cflagDF, cmdRead, 0, 4096, nil)
			require.Equal(t, chunkOffsetData, c.typ)
		} else {
			require.Equal(t, EINVAL, r.errno(cflagDF, cmdRead, 0, 4096, nil))
		}
	}
}

func TestCommandsFlushTrimZeroes(t *testing.T) {
	dev := &counting{Device: blockdevtest.NewMem(t, cmdSize, 512)}
	r := cmdSession(t, dev, false, true)
	fill := bytes.Repeat([]byte{0xee}, 65536)

	require.Equal(t, Errno(0), r.errno(0, cmdFlush, 0, 0, nil))
	require.Equal(t, int64(1), dev.n(opFlush))
	require.Equal(t, EINVAL, r.errno(0, cmdFlush, 512, 0, nil))
	require.Equal(t, EINVAL, r.errno(0, cmdFlush, 0, 512, nil))

	require.Equal(t, Errno(0), r.errno(0, cmdWrite, 0, 65536, fill))
	require.Equal(t, Errno(0), r.errno(cflagFUA, cmdTrim, 0, 8192, nil))
	require.Equal(t, make([]byte, 8192), r.readData(0, 8192, true))
	require.Equal(t, int64(1), dev.n(opDiscard))

	// WRITE_ZEROES without NO_HOLE may punch (discard); with it, zeroes
	// are written.
	require.Equal(t, Errno(0), r.errno(0, cmdWriteZeroes, 8192, 4096, nil))
	require.Equal(t, int64(2), dev.n(opDiscard))
	require.Equal(t, Errno(0), r.errno(cflagNoHole, cmdWriteZeroes, 12288, 4096, nil))
	require.Equal(t, int64(1), dev.n(opZero))
	require.Equal(t, make([]byte, 16384), r.readData(0, 16384, true))
	require.Equal(t, fill[:4096], r.readData(16384, 4096, true))
	// FAST_ZERO: fine where the device zeroes natively.
	require.Equal(t, Errno(0), r.errno(cflagFastZero|cflagNoHole, cmdWriteZeroes, 16384, 4096, nil))
	require.Equal(t, Errno(0), r.errno(cflagFastZero, cmdWriteZeroes, 20480, 4096, nil))
	require.Equal(t, make([]byte, 4096), r.readData(20480, 4096, true))

	require.Equal(t, Errno(0), r.errno(0, cmdCache, 0, 65536, nil))
	require.Equal(t, EINVAL, r.errno(0, cmdCache, cmdSize-512, 1024, nil))
}

func TestCommandsFastZeroRefused(t *testing.T) {
	// A plain Mem has no ZeroWriter: zeroing without holes means writing
	// buffers, which FAST_ZERO must refuse, changing nothing.
	mem := blockdevtest.NewMem(t, cmdSize, 512)
	r := cmdSession(t, blockdevtest.NewFaulty(mem), false, true)
	fill := bytes.Repeat([]byte{0xee}, 4096)
	require.Equal(t, Errno(0), r.errno(0, cmdWrite, 0, 4096, fill))
	require.Equal(t, ENOTSUP, r.errno(cflagFastZero|cflagNoHole, cmdWriteZeroes, 0, 4096, nil))
	require.Equal(t, fill, r.readData(0, 4096, true))
	// Without FAST_ZERO the same request succeeds.
	require.Equal(t, Errno(0), r.errno(cflagNoHole, cmdWriteZeroes, 0, 4096, nil))
	require.Equal(t, make([]byte, 4096), r.readData(0, 4096, true))
}

func TestCommandsBlockStatus(t *testing.T) {
	mem := blockdevtest.NewMem(t, cmdSize, 512)
	_, err := mem.WriteAt(bytes.Repeat([]byte{1}, 8192), 8192)
	require.NoError(t, err)
	r := cmdSession(t, mem, false, true)

	extents := func(flags uint16, off uint64, n uint32) [][2]uint32 {
		c := r.roundTrip(flags, cmdBlockStatus, off, n, nil)
		require.Equal(t, chunkBlockStatus, c.typ, "chunk %d payload %x", c.typ, c.payload)
		require.Equal(t, replyFlagDone, c.flags)
		require.Equal(t, uint32(metaContextID), be.Uint32(c.payload))
		var out [][2]uint32
		for b := c.payload[4:]; len(b) > 0; b = b[8:] {
			out = append(out, [2]uint32{be.Uint32(b), be.Uint32(b[4:])})
		}
		return out
	}
	hz := stateHole | stateZero
	require.Equal(t, [][2]uint32{{8192, hz}, {8192, 0}, {cmdSize - 16384, hz}}, extents(0, 0, cmdSize))
	require.Equal(t, [][2]uint32{{8192, hz}}, extents(cflagReqOne, 0, cmdSize))
	require.Equal(t, [][2]uint32{{4096, 0}, {4096, hz}}, extents(0, 12288, 8192))

	require.Equal(t, EINVAL, r.errno(0, cmdBlockStatus, 0, 0, nil))
	require.Equal(t, EINVAL, r.errno(0, cmdBlockStatus, cmdSize-4096, 8192, nil))
	require.Equal(t, EINVAL, r.errno(cflagNoHole, cmdBlockStatus, 0, 4096, nil))
}

func TestCommandsBlockStatusWithoutMapper(t *testing.T) {
	// A device that cannot tell holes reports everything allocated.
	r := cmdSession(t, blockdevtest.NewFaulty(blockdevtest.NewMem(t, cmdSize, 512)), false, true)
	c := r.roundTrip(0, cmdBlockStatus, 4096, 65536, nil)
	require.Equal(t, chunkBlockStatus, c.typ)
	require.Equal(t, []uint32{metaContextID, 65536, 0},
		[]uint32{be.Uint32(c.payload), be.Uint32(c.payload[4:]), be.Uint32(c.payload[8:])})
}

func TestCommandsInvalid(t *testing.T) {
	for _, structured := range []bool{false, true} {
		ts := startServer(t, Options{}, Export{Name: "d", Device: blockdevtest.NewMem(t, cmdSize, 512)})
		r := dialRaw(t, ts)
		r.session("d", structured, false) // no metadata context
		for _, tc := range []struct {
			name    string
			flags   uint16
			typ     uint16
			off     uint64
			n       uint32
			payload []byte
			want    Errno
		}{
			{name: "unknown command", typ: 99, want: EINVAL},
			{name: "resize", typ: 8, want: EINVAL},
			{name: "unknown flag", flags: 1 << 7, typ: cmdRead, n: 512, want: EINVAL},
			{name: "payload-len flag", flags: 1 << 5, typ: cmdFlush, want: EINVAL},
			{name: "NO_HOLE on write", flags: cflagNoHole, typ: cmdWrite, n: 512, payload: make([]byte, 512), want: EINVAL},
			{name: "REQ_ONE on read", flags: cflagReqOne, typ: cmdRead, n: 512, want: EINVAL},
			{name: "block status without context", typ: cmdBlockStatus, n: 512, want: EINVAL},
			{name: "read past end", typ: cmdRead, off: cmdSize - 512, n: 1024, want: EINVAL},
			{name: "read at end+1", typ: cmdRead, off: cmdSize + 512, n: 512, want: EINVAL},
			{name: "read offset overflow", typ: cmdRead, off: 1<<64 - 512, n: 1024, want: EINVAL},
			{name: "write past end", typ: cmdWrite, off: cmdSize - 512, n: 1024, payload: make([]byte, 1024), want: ENOSPC},
			{name: "write offset overflow", typ: cmdWrite, off: 1<<64 - 512, n: 1024, payload: make([]byte, 1024), want: ENOSPC},
			{name: "zeroes past end", typ: cmdWriteZeroes, off: cmdSize, n: 512, want: ENOSPC},
			{name: "trim past end", typ: cmdTrim, off: cmdSize, n: 512, want: EINVAL},
			{name: "misaligned read past end", typ: cmdRead, off: cmdSize - 100, n: 101, want: EINVAL},
			{name: "misaligned write past end", typ: cmdWrite, off: cmdSize - 99, n: 100, payload: make([]byte, 100), want: ENOSPC},
			{name: "oversized read", typ: cmdRead, n: MaxRequest + 512, want: EINVAL},
			{name: "oversized write", typ: cmdWrite, n: MaxRequest + 512, payload: make([]byte, MaxRequest+512), want: EINVAL},
		} {
			got := r.errno(tc.flags, tc.typ, tc.off, tc.n, tc.payload)
			require.Equal(t, tc.want, got, "%s (structured %v)", tc.name, structured)
		}
		// Still in step after all that: a write and a read work.
		p := bytes.Repeat([]byte{3}, 512)
		require.Equal(t, Errno(0), r.errno(0, cmdWrite, 0, 512, p))
		require.Equal(t, p, r.readData(0, 512, structured))
	}
}

func TestCommandsReadOnly(t *testing.T) {
	r := cmdSession(t, blockdevtest.NewMem(t, cmdSize, 512), true, true)
	require.Equal(t, EPERM, r.errno(0, cmdWrite, 0, 512, make([]byte, 512)))
	require.Equal(t, EPERM, r.errno(0, cmdTrim, 0, 512, nil))
	require.Equal(t, EPERM, r.errno(0, cmdWriteZeroes, 0, 512, nil))
	require.Equal(t, Errno(0), r.errno(0, cmdFlush, 0, 0, nil))
	require.Equal(t, make([]byte, 512), r.readData(0, 512, true))
}

func TestCommandsReadErrorReachesClient(t *testing.T) {
	for _, structured := range []bool{false, true} {
		f := blockdevtest.NewFaulty(blockdevtest.NewMem(t, cmdSize, 512))
		f.FailNth(blockdevtest.OpRead, 1, blockdev.ErrIO)
		r := cmdSession(t, f, false, structured)
		c := r.roundTrip(0, cmdRead, 0, 4096, nil)
		require.Equal(t, EIO, errnoOfReply(t, c))
		if structured {
			require.Equal(t, chunkError, c.typ)
			require.NotZero(t, be.Uint16(c.payload[4:]), "error chunk carries a message")
		}
		// No data followed the error: the next reply parses.
		require.Equal(t, make([]byte, 4096), r.readData(0, 4096, structured))
		// Write errors too.
		f.FailNth(blockdevtest.OpWrite, 1, blockdev.ErrIO)
		require.Equal(t, EIO, r.errno(0, cmdWrite, 0, 512, make([]byte, 512)))
	}
}

func TestCommandsBadRequestMagic(t *testing.T) {
	r := cmdSession(t, blockdevtest.NewMem(t, cmdSize, 512), false, true)
	b := make([]byte, requestLen)
	encodeRequest(b, request{typ: cmdRead, handle: 1, length: 512})
	b[0] ^= 0xff
	r.write(b)
	r.expectClosed()
}

func TestCommandsTruncatedRequest(t *testing.T) {
	r := cmdSession(t, blockdevtest.NewMem(t, cmdSize, 512), false, true)
	b := make([]byte, requestLen)
	encodeRequest(b, request{typ: cmdWrite, handle: 1, length: 4096})
	r.write(b, make([]byte, 1000)) // payload cut short
	require.NoError(t, r.nc.(interface{ CloseWrite() error }).CloseWrite())
	r.expectClosed()
}

func TestCommandsDisconnect(t *testing.T) {
	mem := blockdevtest.NewMem(t, cmdSize, 512)
	r := cmdSession(t, mem, false, true)
	p := bytes.Repeat([]byte{9}, 4096)
	r.req(0, cmdWrite, 5, 0, 4096, p)
	r.req(0, cmdDisc, 6, 0, 0, nil)
	// The write in flight is answered, then the server hangs up.
	c := r.anyReply()
	require.Equal(t, uint64(5), c.handle)
	require.Equal(t, Errno(0), errnoOfReply(t, c))
	r.expectClosed()
	got := make([]byte, 4096)
	_, err := mem.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, p, got)
}

// gated blocks reads at one offset until released.
type gated struct {
	blockdev.Device
	at      int64
	entered chan struct{}
	release chan struct{}
}

func newGated(dev blockdev.Device, at int64) *gated {
	return &gated{Device: dev, at: at, entered: make(chan struct{}, 1), release: make(chan struct{})}
}

func (g *gated) ReadAt(p []byte, off int64) (int, error) {
	if off == g.at {
		g.entered <- struct{}{}
		<-g.release
	}
	return g.Device.ReadAt(p, off)
}

func TestCommandsOutOfOrder(t *testing.T) {
	g := newGated(blockdevtest.NewMem(t, cmdSize, 512), 0)
	r := cmdSession(t, g, false, true)
	r.req(0, cmdRead, 1, 0, 512, nil) // blocks in the device
	<-g.entered
	// Requests behind it are answered while it waits.
	for h := uint64(2); h < 10; h++ {
		r.req(0, cmdRead, h, 4096*h, 512, nil)
	}
	seen := map[uint64]bool{}
	for range 8 {
		c := r.anyReply()
		require.NotEqual(t, uint64(1), c.handle)
		seen[c.handle] = true
	}
	require.Len(t, seen, 8)
	close(g.release)
	require.Equal(t, uint64(1), r.anyReply().handle)
}
