package nbd

// Wire formats of the NBD protocol (fixed newstyle negotiation, simple and
// structured replies), as the server and the client of this package speak
// them. All integers are big-endian.
//
// Server greeting (18 bytes):
//
//	off  size  field
//	0    8     NBDMAGIC     0x4e42444d41474943 ("NBDMAGIC")
//	8    8     IHAVEOPT     0x49484156454f5054 ("IHAVEOPT")
//	16   2     handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//
// Client flags (4 bytes): FIXED_NEWSTYLE | NO_ZEROES, no other bit.
//
// Option request (16 bytes + data):
//
//	0    8     IHAVEOPT
//	8    4     option code
//	12   4     data length
//	16   n     data
//
// Option reply (20 bytes + data):
//
//	0    8     0x0003e889045565a9
//	8    4     option code being answered
//	12   4     reply type (bit 31: error)
//	16   4     data length
//	20   n     data
//
// NBD_OPT_EXPORT_NAME reply (10 bytes, then 124 zero bytes unless both
// sides set NO_ZEROES): size (8), transmission flags (2).
//
// Request (28 bytes, then length bytes of data for NBD_CMD_WRITE):
//
//	0    4     0x25609513
//	4    2     command flags
//	6    2     command type
//	8    8     handle
//	16   8     offset
//	24   4     length
//
// Simple reply (16 bytes, then the data of a successful NBD_CMD_READ):
//
//	0    4     0x67446698
//	4    4     error (NBD errno, 0 for success)
//	8    8     handle
//
// Structured reply chunk (20 bytes + payload):
//
//	0    4     0x668e33ef
//	4    2     flags (bit 0: DONE)
//	6    2     chunk type
//	8    8     handle
//	16   4     payload length
//
// Chunk payloads: OFFSET_DATA = offset (8) + data; OFFSET_HOLE = offset (8)
// + hole size (4); BLOCK_STATUS = context id (4) + descriptors of length (4)
// and status flags (4); ERROR = errno (4) + message length (2) + message;
// ERROR_OFFSET = ERROR's fields + offset (8).

import "encoding/binary"

var be = binary.BigEndian

// Magic numbers.
const (
	magicInit        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt         uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply    uint64 = 0x0003e889045565a9
	magicRequest     uint32 = 0x25609513
	magicSimple      uint32 = 0x67446698
	magicStructured  uint32 = 0x668e33ef
	greetingLen             = 18
	optHeaderLen            = 16
	optReplyLen             = 20
	requestLen              = 28
	simpleReplyLen          = 16
	structReplyLen          = 20
	exportNameZeroes        = 124
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  uint16 = 1 << 0
	flagNoZeroes       uint16 = 1 << 1
	cflagFixedNewstyle uint32 = 1 << 0
	cflagNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags     uint16 = 1 << 0
	tflagReadOnly     uint16 = 1 << 1
	tflagSendFlush    uint16 = 1 << 2
	tflagSendFUA      uint16 = 1 << 3
	tflagRotational   uint16 = 1 << 4
	tflagSendTrim     uint16 = 1 << 5
	tflagWriteZeroes  uint16 = 1 << 6
	tflagSendDF       uint16 = 1 << 7
	tflagMultiConn    uint16 = 1 << 8
	tflagSendResize   uint16 = 1 << 9
	tflagSendCache    uint16 = 1 << 10
	tflagSendFastZero uint16 = 1 << 11
)

// Option codes.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	repAck           uint32 = 1
	repServer        uint32 = 2
	repInfo          uint32 = 3
	repMetaContext   uint32 = 4
	repErrUnsup      uint32 = 1<<31 + 1
	repErrPolicy     uint32 = 1<<31 + 2
	repErrInvalid    uint32 = 1<<31 + 3
	repErrPlatform   uint32 = 1<<31 + 4
	repErrTLSReqd    uint32 = 1<<31 + 5
	repErrUnknown    uint32 = 1<<31 + 6
	repErrShutdown   uint32 = 1<<31 + 7
	repErrBlockSize  uint32 = 1<<31 + 8
	repErrTooBig     uint32 = 1<<31 + 9
	repErrExtHeaders uint32 = 1<<31 + 10
)

// NBD_REP_INFO information types.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Command types.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cflagFUA      uint16 = 1 << 0
	cflagNoHole   uint16 = 1 << 1
	cflagDF       uint16 = 1 << 2
	cflagReqOne   uint16 = 1 << 3
	cflagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone    uint16 = 1 << 0
	chunkNone        uint16 = 0
	chunkOffsetData  uint16 = 1
	chunkOffsetHole  uint16 = 2
	chunkBlockStatus uint16 = 5
	chunkError       uint16 = 1<<15 + 1
	chunkErrorOffset uint16 = 1<<15 + 2
	chunkErrorBit    uint16 = 1 << 15
)

// base:allocation status flags.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

// metaBaseAllocation is the one metadata context the protocol defines.
const metaBaseAllocation = "base:allocation"

// Limits.
const (
	// MaxRequest is the largest READ, WRITE or CACHE the server accepts
	// and the client sends: 32 MiB, the size every implementation must
	// accept without calling it a denial of service.
	MaxRequest = 32 << 20
	// maxString is the protocol's bound on names and messages.
	maxString = 4096
	// maxOptionData bounds an option's data; an option claiming more is
	// treated as a denial of service and the connection is dropped.
	maxOptionData = 64 << 10
	// maxErrorMessage bounds the message in an error chunk we send.
	maxErrorMessage = 512
)

// request is a decoded request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
}

// decodeRequest parses a 28-byte request header. It reports false when the
// magic is wrong, after which the stream cannot be trusted.
func decodeRequest(b []byte) (request, bool) {
	if len(b) < requestLen || be.Uint32(b[0:]) != magicRequest {
		return request{}, false
	}
	return request{
		flags:  be.Uint16(b[4:]),
		typ:    be.Uint16(b[6:]),
		handle: be.Uint64(b[8:]),
		off:    be.Uint64(b[16:]),
		length: be.Uint32(b[24:]),
	}, true
}

// encodeRequest writes a request header into b[:requestLen].
func encodeRequest(b []byte, r request) {
	be.PutUint32(b[0:], magicRequest)
	be.PutUint16(b[4:], r.flags)
	be.PutUint16(b[6:], r.typ)
	be.PutUint64(b[8:], r.handle)
	be.PutUint64(b[16:], r.off)
	be.PutUint32(b[24:], r.length)
}

func putSimpleReply(b []byte, errno uint32, handle uint64) {
	be.PutUint32(b[0:], magicSimple)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], handle)
}

func putChunkHeader(b []byte, flags, typ uint16, handle uint64, length uint32) {
	be.PutUint32(b[0:], magicStructured)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], handle)
	be.PutUint32(b[16:], length)
}

func putOptReply(b []byte, opt, typ, length uint32) {
	be.PutUint64(b[0:], magicOptReply)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], length)
}
