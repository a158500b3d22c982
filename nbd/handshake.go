package nbd

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// errAbort ends a negotiation the client ended with NBD_OPT_ABORT.
var errAbort = errors.New("nbd: client aborted negotiation")

// negotiate runs the server's side of fixed newstyle negotiation and
// returns the export the client chose. Any error means: close the
// connection (the spec's hard disconnect, or the end of an abort).
func (c *conn) negotiate() (*export, error) {
	var g [greetingLen]byte
	be.PutUint64(g[0:], magicInit)
	be.PutUint64(g[8:], magicOpt)
	be.PutUint16(g[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.bw.Write(g[:]); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, err
	}
	flags := be.Uint32(cf[:])
	if flags&^(cflagFixedNewstyle|cflagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, flags)
	}
	c.noZeroes = flags&cflagNoZeroes != 0
	c.fixed = flags&cflagFixedNewstyle != 0
	for {
		x, err := c.option()
		if err != nil || x != nil {
			return x, err
		}
		if err := c.bw.Flush(); err != nil {
			return nil, err
		}
	}
}

// option reads and answers one option. It returns the export when the
// option ends negotiation successfully.
func (c *conn) option() (*export, error) {
	var h [optHeaderLen]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return nil, err
	}
	if be.Uint64(h[0:]) != magicOpt {
		return nil, fmt.Errorf("%w: bad option magic %#x", ErrProtocol, be.Uint64(h[0:]))
	}
	opt, n := be.Uint32(h[8:]), be.Uint32(h[12:])
	if n > maxOptionData {
		// Reading (or skipping) gigabytes of option data is a denial of
		// service; the spec allows a hard disconnect.
		return nil, fmt.Errorf("%w: option %d with %d bytes of data", ErrProtocol, opt, n)
	}
	if cap(c.opt) < int(n) {
		c.opt = make([]byte, n)
	}
	data := c.opt[:n]
	if _, err := io.ReadFull(c.br, data); err != nil {
		return nil, err
	}
	if c.draining.Load() && opt != optAbort && opt != optExportName {
		return nil, c.optReply(opt, repErrShutdown, "server shutting down")
	}
	if c.srv.opts.TLS == TLSRequire && !c.tlsOn {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			// It cannot fail politely: hard disconnect.
			return nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS", ErrTLSRequired)
		default:
			return nil, c.optReply(opt, repErrTLSReqd, refusalMessage(repErrTLSReqd))
		}
	}
	switch opt {
	case optStartTLS:
		if !c.fixed {
			// The protocol allows TLS only after fixed newstyle.
			return nil, c.optReply(opt, repErrPolicy, "TLS needs fixed newstyle negotiation")
		}
		return nil, c.startTLS(data)
	case optExportName:
		return c.exportName(data)
	case optAbort:
		if err := c.optReply(opt, repAck, ""); err != nil {
			return nil, err
		}
		c.bw.Flush()
		return nil, errAbort
	case optList:
		return nil, c.list(data)
	case optInfo, optGo:
		return c.info(opt, data)
	case optStructuredReply:
		switch {
		case len(data) != 0:
			return nil, c.optReply(opt, repErrInvalid, "structured reply takes no data")
		case c.structured:
			return nil, c.optReply(opt, repErrInvalid, "structured replies already negotiated")
		}
		c.structured = true
		return nil, c.optReply(opt, repAck, "")
	case optListMetaContext, optSetMetaContext:
		return nil, c.metaContext(opt, data)
	}
	// EXTENDED_HEADERS and anything unknown.
	return nil, c.optReply(opt, repErrUnsup, "option not supported")
}

// optReply sends a reply with a string payload (an error message, or
// nothing).
func (c *conn) optReply(opt, typ uint32, msg string) error {
	var h [optReplyLen]byte
	putOptReply(h[:], opt, typ, uint32(len(msg)))
	c.bw.Write(h[:])
	_, err := c.bw.WriteString(msg)
	return err
}

func (c *conn) exportName(data []byte) (*export, error) {
	if len(data) > maxString {
		return nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, len(data))
	}
	x := c.srv.lookup(string(data))
	if x == nil {
		// NBD_OPT_EXPORT_NAME cannot fail politely: hard disconnect.
		return nil, fmt.Errorf("%w: %q", ErrUnknownExport, data)
	}
	ro, refusal := c.access(x)
	if refusal != 0 {
		return nil, fmt.Errorf("nbd: export %q: %s", x.Name, refusalMessage(refusal))
	}
	if err := c.srv.establish(c, x); err != nil {
		return nil, err
	}
	c.selectExport(x, ro)
	var b [10 + exportNameZeroes]byte
	be.PutUint64(b[0:], uint64(c.size))
	be.PutUint16(b[8:], c.flags)
	reply := b[:]
	if c.noZeroes {
		reply = b[:10]
	}
	if _, err := c.bw.Write(reply); err != nil {
		return nil, err
	}
	return x, c.bw.Flush()
}

func (c *conn) list(data []byte) error {
	if len(data) != 0 {
		return c.optReply(optList, repErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, x := range c.srv.list() {
		if _, refusal := c.access(x); refusal != 0 {
			continue // not even listed
		}
		var h [optReplyLen + 4]byte
		putOptReply(h[:], optList, repServer, uint32(4+len(x.Name)+len(x.Description)))
		be.PutUint32(h[optReplyLen:], uint32(len(x.Name)))
		c.bw.Write(h[:])
		c.bw.WriteString(x.Name)
		c.bw.WriteString(x.Description)
	}
	return c.optReply(optList, repAck, "")
}

// infoRequest is a parsed NBD_OPT_INFO or NBD_OPT_GO.
type infoRequest struct {
	name  string
	items uint64 // bit i set: information type i requested (i < 64)
}

// parseInfo decodes the data of NBD_OPT_INFO and NBD_OPT_GO: name length
// (4), name, number of requests (2), requests (2 each), nothing more.
func parseInfo(data []byte) (infoRequest, bool) {
	if len(data) < 6 {
		return infoRequest{}, false
	}
	n := be.Uint32(data)
	if uint64(n) > uint64(len(data)-6) || n > maxString {
		return infoRequest{}, false
	}
	r := infoRequest{name: string(data[4 : 4+n])}
	rest := data[4+n:]
	count := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return infoRequest{}, false
	}
	for i := 0; i < count; i++ {
		if t := be.Uint16(rest[2*i:]); t < 64 {
			r.items |= 1 << t
		}
	}
	return r, true
}

func (c *conn) info(opt uint32, data []byte) (*export, error) {
	req, ok := parseInfo(data)
	if !ok {
		return nil, c.optReply(opt, repErrInvalid, "malformed NBD_OPT_INFO/GO data")
	}
	x := c.srv.lookup(req.name)
	if x == nil {
		return nil, c.optReply(opt, repErrUnknown, "no such export")
	}
	ro, refusal := c.access(x)
	if refusal != 0 {
		return nil, c.optReply(opt, refusal, refusalMessage(refusal))
	}
	if opt == optGo {
		if err := c.srv.establish(c, x); err != nil {
			return nil, c.refuse(opt, err)
		}
	}
	c.selectExport(x, ro)
	var b [optReplyLen + 14]byte
	putOptReply(b[:], opt, repInfo, 12)
	be.PutUint16(b[20:], infoExport)
	be.PutUint64(b[22:], uint64(c.size))
	be.PutUint16(b[30:], c.flags)
	c.bw.Write(b[:optReplyLen+12])
	// Block size constraints are always sent: any alignment is served
	// (minimum 1, partial blocks by read-modify-write, see subblock.go),
	// whole device blocks are the efficient size, and MaxRequest is the
	// largest payload.
	putOptReply(b[:], opt, repInfo, 14)
	be.PutUint16(b[20:], infoBlockSize)
	be.PutUint32(b[22:], 1)
	be.PutUint32(b[26:], max(uint32(x.Device.BlockSize()), 512))
	be.PutUint32(b[30:], MaxRequest)
	c.bw.Write(b[:optReplyLen+14])
	if req.items&(1<<infoName) != 0 {
		c.infoString(opt, infoName, x.Name)
	}
	if req.items&(1<<infoDescription) != 0 && x.Description != "" {
		c.infoString(opt, infoDescription, x.Description)
	}
	if err := c.optReply(opt, repAck, ""); err != nil {
		return nil, err
	}
	if opt != optGo {
		return nil, nil
	}
	if c.metaExport != x {
		// Contexts chosen for another export do not carry over.
		c.meta = false
	}
	return x, c.bw.Flush()
}

// refuse answers an NBD_OPT_GO that establish turned down.
func (c *conn) refuse(opt uint32, err error) error {
	switch {
	case errors.Is(err, ErrUnknownExport):
		return c.optReply(opt, repErrUnknown, "no such export")
	case errors.Is(err, errConnLimit):
		return c.optReply(opt, repErrPolicy, err.Error())
	case errors.Is(err, ErrShutdown):
		return c.optReply(opt, repErrShutdown, "server shutting down")
	}
	return err
}

func (c *conn) infoString(opt uint32, typ uint16, s string) {
	var h [optReplyLen + 2]byte
	putOptReply(h[:], opt, repInfo, uint32(2+len(s)))
	be.PutUint16(h[optReplyLen:], typ)
	c.bw.Write(h[:])
	c.bw.WriteString(s)
}

// selectExport records the export, whether this connection may write it,
// and the transmission flags it would be served with.
func (c *conn) selectExport(x *export, ro bool) {
	c.exp = x
	c.ro = ro
	c.size = x.Device.Size()
	c.bs = int64(x.Device.BlockSize())
	// CAN_MULTI_CONN: every connection to an export shares one Device,
	// and a Device's Flush makes durable every write that completed
	// before it, whichever goroutine (so whichever connection) issued
	// it; FUA writes are durable before they are answered. So the
	// effects of FLUSH and FUA are visible to all connections when they
	// are answered, which is what the flag promises.
	f := tflagHasFlags | tflagSendFlush | tflagSendCache | tflagMultiConn
	if ro {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagWriteZeroes | tflagSendFastZero
	}
	if c.structured {
		f |= tflagSendDF
	}
	c.flags = f
}

// metaQuery is a parsed NBD_OPT_LIST_META_CONTEXT or SET_META_CONTEXT.
type metaQuery struct {
	name    string
	queries []string
}

// parseMeta decodes export name length (4), name, query count (4), then
// per query its length (4) and text; the data must end exactly there.
func parseMeta(data []byte) (metaQuery, bool) {
	if len(data) < 8 {
		return metaQuery{}, false
	}
	n := be.Uint32(data)
	if uint64(n) > uint64(len(data)-8) || n > maxString {
		return metaQuery{}, false
	}
	q := metaQuery{name: string(data[4 : 4+n])}
	rest := data[4+n:]
	count := be.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least 4 bytes, which bounds the allocation by
	// the option's length.
	if uint64(count) > uint64(len(rest)/4) {
		return metaQuery{}, false
	}
	q.queries = make([]string, 0, count)
	for i := uint32(0); i < count; i++ {
		if len(rest) < 4 {
			return metaQuery{}, false
		}
		l := be.Uint32(rest)
		if uint64(l) > uint64(len(rest)-4) || l > maxString {
			return metaQuery{}, false
		}
		q.queries = append(q.queries, string(rest[4:4+l]))
		rest = rest[4+l:]
	}
	return q, len(rest) == 0
}

// metaMatches reports whether a query selects base:allocation. For a list
// request, the namespace alone ("base:") is a wildcard.
func metaMatches(query string, list bool) (match, valid bool) {
	ns, leaf, ok := strings.Cut(query, ":")
	if !ok || ns == "" {
		return false, false
	}
	if ns != "base" {
		return false, true // unknown namespaces are ignored
	}
	return leaf == "allocation" || (list && leaf == ""), true
}

// metaContextID is the id of base:allocation on a connection.
const metaContextID = 1

func (c *conn) metaContext(opt uint32, data []byte) error {
	list := opt == optListMetaContext
	if !list {
		// A SET replaces the selection even when it fails.
		c.meta, c.metaExport = false, nil
	}
	if !c.structured {
		return c.optReply(opt, repErrInvalid, "negotiate structured replies first")
	}
	q, ok := parseMeta(data)
	if !ok {
		return c.optReply(opt, repErrInvalid, "malformed metadata context request")
	}
	x := c.srv.lookup(q.name)
	if x == nil {
		return c.optReply(opt, repErrUnknown, "no such export")
	}
	if _, refusal := c.access(x); refusal != 0 {
		// The protocol keeps ERR_TLS_REQD to INFO, GO and EXPORT_NAME
		// once TLS is optional (FORCEDTLS never gets here before TLS).
		return c.optReply(opt, repErrPolicy, refusalMessage(refusal))
	}
	found := list && len(q.queries) == 0
	for _, s := range q.queries {
		m, valid := metaMatches(s, list)
		if !valid {
			return c.optReply(opt, repErrInvalid, "metadata query without a namespace")
		}
		found = found || m
	}
	if found {
		var h [optReplyLen + 4]byte
		id := uint32(0) // LIST: reserved, zero
		if !list {
			id = metaContextID
			c.meta, c.metaExport = true, x
		}
		putOptReply(h[:], opt, repMetaContext, uint32(4+len(metaBaseAllocation)))
		be.PutUint32(h[optReplyLen:], id)
		c.bw.Write(h[:])
		c.bw.WriteString(metaBaseAllocation)
	}
	return c.optReply(opt, repAck, "")
}
