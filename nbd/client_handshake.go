package nbd

import (
	"crypto/tls"
	"fmt"
)

// handshake runs the client's side of fixed newstyle negotiation: it
// asks for structured replies, the base:allocation context and, with
// NBD_OPT_GO, the export and its block size constraints, falling back to
// NBD_OPT_EXPORT_NAME for servers without NBD_OPT_GO.
func (c *lane) handshake(export string, tlsConf *tls.Config) error {
	var g [greetingLen]byte
	if err := readFull(c.br, g[:]); err != nil {
		return err
	}
	if be.Uint64(g[0:]) != magicInit || be.Uint64(g[8:]) != magicOpt {
		return fmt.Errorf("%w: not a newstyle NBD server", ErrProtocol)
	}
	hflags := be.Uint16(g[16:])
	if hflags&flagFixedNewstyle == 0 {
		return fmt.Errorf("%w: server lacks fixed newstyle negotiation", ErrProtocol)
	}
	cflags := cflagFixedNewstyle
	noZeroes := hflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= cflagNoZeroes
	}
	var b [4]byte
	be.PutUint32(b[:], cflags)
	if _, err := c.bw.Write(b[:]); err != nil {
		return err
	}
	if tlsConf != nil {
		if err := c.startTLS(tlsConf); err != nil {
			return err
		}
	}

	typ, _, err := c.option(optStructuredReply, nil)
	if err != nil {
		return err
	}
	c.info.Structured = typ == repAck
	if c.info.Structured {
		if err := c.setMeta(export); err != nil {
			return err
		}
	}
	ok, err := c.optGo(export)
	if err != nil || ok {
		return err
	}
	return c.exportName(export, noZeroes)
}

// option sends an option and reads its first reply.
func (c *lane) option(opt uint32, data []byte) (uint32, []byte, error) {
	var h [optHeaderLen]byte
	be.PutUint64(h[0:], magicOpt)
	be.PutUint32(h[8:], opt)
	be.PutUint32(h[12:], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	if err := c.bw.Flush(); err != nil {
		return 0, nil, err
	}
	return c.optReply(opt)
}

// optReply reads one option reply to opt.
func (c *lane) optReply(opt uint32) (uint32, []byte, error) {
	var h [optReplyLen]byte
	if err := readFull(c.br, h[:]); err != nil {
		return 0, nil, err
	}
	if be.Uint64(h[0:]) != magicOptReply || be.Uint32(h[8:]) != opt {
		return 0, nil, fmt.Errorf("%w: bad reply to option %d", ErrProtocol, opt)
	}
	typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
	if n > maxOptionData {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
	}
	data := make([]byte, n)
	if err := readFull(c.br, data); err != nil {
		return 0, nil, err
	}
	return typ, data, nil
}

// optError turns an error reply into an error.
func optError(opt, typ uint32, data []byte) error {
	switch typ {
	case repErrUnknown:
		return fmt.Errorf("%w: %s", ErrUnknownExport, data)
	case repErrShutdown:
		return fmt.Errorf("%w: %s", ErrShutdown, data)
	case repErrTLSReqd:
		return fmt.Errorf("%w: %s", ErrTLSRequired, data)
	}
	return fmt.Errorf("nbd: option %d refused (reply %#x): %s", opt, typ, data)
}

func (c *lane) setMeta(export string) error {
	data := be.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = be.AppendUint32(data, 1)
	data = be.AppendUint32(data, uint32(len(metaBaseAllocation)))
	data = append(data, metaBaseAllocation...)
	typ, reply, err := c.option(optSetMetaContext, data)
	for ; err == nil; typ, reply, err = c.optReply(optSetMetaContext) {
		switch {
		case typ == repAck:
			return nil
		case typ == repMetaContext && len(reply) >= 4:
			if string(reply[4:]) == metaBaseAllocation {
				c.metaID = be.Uint32(reply)
				c.info.BlockStatus = true
			}
		case typ&(1<<31) != 0:
			// Not fatal: block status just stays off.
			c.info.BlockStatus = false
			return nil
		default:
			return fmt.Errorf("%w: unexpected reply %d to SET_META_CONTEXT", ErrProtocol, typ)
		}
	}
	return err
}

// optGo negotiates the export with NBD_OPT_GO. It reports false when the
// server does not know the option.
func (c *lane) optGo(export string) (bool, error) {
	data := be.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = be.AppendUint16(data, 2)
	data = be.AppendUint16(data, infoBlockSize)
	data = be.AppendUint16(data, infoName)
	var size int64
	var flags uint16
	haveExport := false
	minBS, maxBS := uint32(1), uint32(0)
	c.info.Name = export
	typ, reply, err := c.option(optGo, data)
	for ; err == nil; typ, reply, err = c.optReply(optGo) {
		switch {
		case typ == repAck:
			if !haveExport {
				return false, fmt.Errorf("%w: NBD_OPT_GO without NBD_INFO_EXPORT", ErrProtocol)
			}
			return true, c.setExport(size, flags, minBS, maxBS)
		case typ == repErrUnsup:
			return false, nil
		case typ&(1<<31) != 0:
			return false, optError(optGo, typ, reply)
		case typ != repInfo || len(reply) < 2:
			return false, fmt.Errorf("%w: unexpected reply %d to NBD_OPT_GO", ErrProtocol, typ)
		}
		switch be.Uint16(reply) {
		case infoExport:
			if len(reply) != 12 {
				return false, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(reply))
			}
			size, flags, haveExport = int64(be.Uint64(reply[2:])), be.Uint16(reply[10:]), true
		case infoBlockSize:
			if len(reply) != 14 {
				return false, fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(reply))
			}
			minBS, maxBS = be.Uint32(reply[2:]), be.Uint32(reply[10:])
		case infoName:
			c.info.Name = string(reply[2:])
		}
	}
	return false, err
}

func (c *lane) exportName(export string, noZeroes bool) error {
	var h [optHeaderLen]byte
	be.PutUint64(h[0:], magicOpt)
	be.PutUint32(h[8:], optExportName)
	be.PutUint32(h[12:], uint32(len(export)))
	c.bw.Write(h[:])
	c.bw.WriteString(export)
	if err := c.bw.Flush(); err != nil {
		return err
	}
	n := 10 + exportNameZeroes
	if noZeroes {
		n = 10
	}
	b := make([]byte, n)
	if err := readFull(c.br, b); err != nil {
		return fmt.Errorf("%w: server closed the connection (unknown export %q?)", err, export)
	}
	// Without NBD_OPT_GO there was no export-specific negotiation for
	// the metadata context either; keep it only with structured replies.
	return c.setExport(int64(be.Uint64(b)), be.Uint16(b[8:]), 1, 0)
}

// setExport records the export's geometry and flags.
func (c *lane) setExport(size int64, flags uint16, minBS, maxBS uint32) error {
	if size < 0 {
		return fmt.Errorf("%w: export size %d", ErrProtocol, size)
	}
	bs := 512
	switch {
	case minBS > 4096:
		return fmt.Errorf("nbd: server minimum block size %d above 4096: not supported", minBS)
	case minBS > 512:
		bs = 4096
	}
	maxReq := MaxRequest
	if maxBS != 0 && int64(maxBS) < int64(maxReq) {
		maxReq = int(maxBS) - int(maxBS)%bs
		if maxReq < bs {
			return fmt.Errorf("%w: maximum block size %d below the block size %d", ErrProtocol, maxBS, bs)
		}
	}
	c.info.Size = size - size%int64(bs)
	c.info.BlockSize = bs
	c.info.MaxRequest = maxReq
	c.info.ReadOnly = flags&tflagReadOnly != 0
	c.info.Flush = flags&tflagSendFlush != 0
	c.info.FUA = flags&tflagSendFUA != 0
	c.info.Trim = flags&tflagSendTrim != 0
	c.info.Zeroes = flags&tflagWriteZeroes != 0
	c.info.FastZero = flags&tflagSendFastZero != 0
	c.info.MultiConn = flags&tflagMultiConn != 0
	c.info.Cache = flags&tflagSendCache != 0
	c.info.BlockStatus = c.info.BlockStatus && c.info.Structured
	return nil
}
