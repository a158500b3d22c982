package nbd

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// allowedFlags lists the command flags each command accepts. FUA is
// accepted on every command, as the spec requires once SEND_FUA is
// advertised (clients are known to set it on reads); DF needs structured
// replies and FAST_ZERO needs SEND_FAST_ZERO, checked in validate.
var allowedFlags = [...]uint16{
	cmdRead:        cflagFUA | cflagDF,
	cmdWrite:       cflagFUA,
	cmdDisc:        0,
	cmdFlush:       cflagFUA,
	cmdTrim:        cflagFUA,
	cmdCache:       cflagFUA,
	cmdWriteZeroes: cflagFUA | cflagNoHole | cflagFastZero,
	cmdBlockStatus: cflagFUA | cflagReqOne,
}

// maxExtents bounds the descriptors of one BLOCK_STATUS reply, so that the
// reply fits a 4 KiB pooled buffer; the client asks again for the rest.
const maxExtents = (4096 - 4) / 8

// validate checks a request against the spec and the export before any
// device call. It returns 0 or the error to answer with.
func (c *conn) validate(r *request) (Errno, string) {
	if int(r.typ) >= len(allowedFlags) {
		return EINVAL, fmt.Sprintf("unknown command %d", r.typ)
	}
	if bad := r.flags &^ allowedFlags[r.typ]; bad != 0 {
		return EINVAL, fmt.Sprintf("flags %#x not valid for command %d", bad, r.typ)
	}
	if r.flags&cflagDF != 0 && !c.structured {
		return EINVAL, "DF without structured replies"
	}
	ro := c.ro
	switch r.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if ro {
			return EPERM, "export is read-only"
		}
	case cmdFlush:
		if r.off != 0 || r.length != 0 {
			return EINVAL, "flush with nonzero offset or length"
		}
		return 0, ""
	case cmdBlockStatus:
		if !c.meta {
			return EINVAL, "no metadata context negotiated"
		}
		if r.length == 0 {
			return EINVAL, "block status of zero length"
		}
	}
	if r.off > uint64(c.size) || uint64(r.length) > uint64(c.size)-r.off {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return ENOSPC, fmt.Sprintf("offset %d length %d past the end (%d)", r.off, r.length, c.size)
		}
		return EINVAL, fmt.Sprintf("offset %d length %d past the end (%d)", r.off, r.length, c.size)
	}
	if (r.typ == cmdRead || r.typ == cmdWrite || r.typ == cmdCache) && r.length > MaxRequest {
		return EINVAL, fmt.Sprintf("length %d above the maximum %d", r.length, MaxRequest)
	}
	return 0, ""
}

// handle runs one request and answers it.
func (c *conn) handle(t *task) {
	r := &t.req
	errno, msg := t.errno, ""
	if errno == 0 {
		errno, msg = c.validate(r)
	} else {
		msg = fmt.Sprintf("length %d above the maximum %d", r.length, MaxRequest)
	}
	st := &c.exp.stats
	st.requests.Add(1)
	if errno != 0 {
		st.errors.Add(1)
		c.replyErr(r, errno, msg)
		return
	}
	dev := c.exp.Device
	off, n := int64(r.off), int64(r.length)
	fua := r.flags&cflagFUA != 0
	var err error
	switch r.typ {
	case cmdRead:
		if err = c.readAt(t.buf, off); err == nil {
			st.bytesRead.Add(uint64(n))
			c.replyRead(r, t.buf)
			return
		}
	case cmdWrite:
		c.dirty.Store(true)
		if err = c.writeAt(t.buf, off, fua); err == nil {
			st.bytesWritten.Add(uint64(n))
		}
	case cmdFlush:
		err = dev.Flush()
	case cmdTrim:
		c.dirty.Store(true)
		err = c.zeroRange(off, n, false, fua)
	case cmdWriteZeroes:
		if errno, msg = c.writeZeroes(r); errno != 0 {
			st.errors.Add(1)
			c.replyErr(r, errno, msg)
			return
		}
	case cmdCache:
		err = c.cache(off, n)
	case cmdBlockStatus:
		var payload *[]byte
		if payload, err = c.blockStatus(r); err == nil {
			c.replyBlockStatus(r, *payload)
			putBuf(payload)
			return
		}
	}
	if err != nil {
		st.errors.Add(1)
		c.logDeviceError(r, err)
		c.replyErr(r, errnoOf(err), err.Error())
		return
	}
	c.replyOK(r.handle)
}

// writeZeroes zeroes a range. Without NO_HOLE whole blocks are
// discarded, which the Device contract says reads back as zeros and which
// is the cheap way; with NO_HOLE they are written as zeros (ZeroWriter
// where the device has it). Partial blocks are written as zeros either
// way. FAST_ZERO is refused with ENOTSUP when the only way is writing
// zeros (no ZeroWriter, or partial blocks that need a read-modify-write),
// which is no faster than a WRITE.
func (c *conn) writeZeroes(r *request) (Errno, string) {
	dev := c.exp.Device
	off, n := int64(r.off), int64(r.length)
	noHole := r.flags&cflagNoHole != 0
	if r.flags&cflagFastZero != 0 {
		if head, _, tail := span(off, n, c.bs); head != 0 || tail != 0 {
			return ENOTSUP, "zeroing partial blocks would be no faster than writing"
		}
		if _, ok := dev.(blockdev.ZeroWriter); noHole && !ok {
			return ENOTSUP, "zeroing without holes would be no faster than writing"
		}
	}
	c.dirty.Store(true)
	if err := c.zeroRange(off, n, noHole, r.flags&cflagFUA != 0); err != nil {
		c.logDeviceError(r, err)
		return errnoOf(err), err.Error()
	}
	return 0, ""
}

// cache reads the range through the device, so that a device with a
// cache of its own (a page cache, a hydrating clone) has it at hand. The
// data itself is dropped.
func (c *conn) cache(off, n int64) error {
	const chunk = 1 << 20
	// Whole blocks only: widen the range to block boundaries.
	end := off + n
	off -= off % c.bs
	n = end - off + (c.bs-end%c.bs)%c.bs
	p := getBuf(int(min(n, chunk)))
	defer putBuf(p)
	for n > 0 {
		k := min(n, int64(len(*p)), chunk)
		if _, err := c.exp.Device.ReadAt((*p)[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// blockStatus builds the payload of the base:allocation chunk: the
// context id, then descriptors from the device's AllocationMapper, merged
// where consecutive states agree. A device that cannot tell reports the
// whole range allocated (status 0), which is always true. The device is
// asked about whole blocks; the first and last descriptors are cut to the
// request, and a partial block takes the state of its block.
func (c *conn) blockStatus(r *request) (*[]byte, error) {
	p := getBuf(4 + 8*maxExtents)
	b := (*p)[:4]
	be.PutUint32(b, metaContextID)
	am, ok := c.exp.Device.(blockdev.AllocationMapper)
	if !ok {
		b = be.AppendUint32(b, r.length)
		b = be.AppendUint32(b, 0)
		*p = b
		return p, nil
	}
	start, end := int64(r.off), int64(r.off)+int64(r.length)
	pos := start - start%c.bs
	stop := end + (c.bs-end%c.bs)%c.bs
	reqOne := r.flags&cflagReqOne != 0
	var last uint32
	for pos < stop {
		l, st, err := am.MapAllocation(pos, stop-pos)
		if err != nil {
			putBuf(p)
			return nil, err
		}
		if l <= 0 || l > stop-pos {
			// A mapper that breaks its contract: report the rest as
			// allocated, which is never wrong.
			l, st = stop-pos, blockdev.Allocated
		}
		seg := min(pos+l, end) - max(pos, start)
		pos += l
		var flags uint32
		switch st {
		case blockdev.Hole:
			flags = stateHole | stateZero
		case blockdev.Zero:
			flags = stateZero
		}
		switch {
		case len(b) > 4 && flags == last:
			i := len(b) - 8
			be.PutUint32(b[i:], be.Uint32(b[i:])+uint32(seg))
		case len(b) > 4 && (reqOne || len(b)+8 > cap(b)):
			pos = stop // one descriptor asked for, or the buffer is full
		default:
			b = be.AppendUint32(b, uint32(seg))
			b = be.AppendUint32(b, flags)
			last = flags
		}
	}
	*p = b
	return p, nil
}
