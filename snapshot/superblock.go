package snapshot

// The store superblock: the first 4096 bytes of the store device.
//
//	offset size  field
//	     0    8  magic "BSNAPSTR"
//	     8    4  format version (2; version 1 is refused with ErrOldFormat)
//	    12    4  CRC32C of bytes [0, 4096) with this field zero, salted with saltSuperblock
//	    16    8  location of this block (0): a misdirected block is detected
//	    24    4  chunk size in bytes (power of two, 4 KiB .. 1 MiB)
//	    28    4  flags: bit 0 = transient (the store keeps no metadata on
//	             the device and cannot be opened); other bits must be 0
//	    32    8  origin size in bytes
//	    40    8  store size in bytes at Format (a minimum: the device may grow)
//	    48    8  journal region offset in bytes
//	    56    8  journal region length in bytes
//	    64    8  data region offset in bytes (a multiple of the chunk size)
//	    72    8  data chunks at Format (a minimum: the metadata layer's data
//	             space map is the current count; grow.go)
//	    80   16  store UUID (random at Format)
//	    96    8  format time (unix ns; the origin volume's creation time; 0 = unknown)
//	   104    8  metadata region offset in bytes (version 2; a multiple of 4096)
//	   112    8  metadata region length in bytes (version 2; a multiple of 4096)
//	   120    8  largest volume size in bytes (the chunk space's bound, a multiple
//	             of the chunk size; 0 in stores formatted before it: the origin's size)
//	   128    4  pool flags: bit 0 = no origin (the origin size is then 0); other
//	             bits must be 0
//	   132   28  zero (reserved for the pool)
//	   160    8  identity region offset in bytes (4096, or 0: none)
//	   168    8  identity region length in bytes (8192, or 0: none)
//	   176 3920  zero
//
// All integers little-endian. The region [0, 4096) is the superblock; the
// identity region (identity.go: the owner record and the origin's
// fingerprint, in two copies that change while the store is open, so that
// the block above is written only by Format, never rewritten) follows it in stores
// formatted since it exists, then the journal region, then the metadata region (the paged index and
// space maps of package snapshot/internal/meta, docs/metadata.md), then
// the data region. Version 1 had no metadata region: its index lived in
// the journal's checkpoints, and its allocation bitmap was derived from
// the index at Open; Migrate converts such a store.

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

const (
	superblockSize    = 4096
	superblockMagic   = "BSNAPSTR"
	superblockVersion = 2
	// oldSuperblockVersion is the last format Migrate reads.
	oldSuperblockVersion = 1

	minChunkSize = 4 << 10
	maxChunkSize = 1 << 20
)

// Checksum salts, one per structure type, so a block of one kind can never
// pass for another.
const (
	saltSuperblock = 0x5b5ca501
	saltCheckpoint = 0x5b5ca502
	saltRecord     = 0x5b5ca503
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func checksum(salt uint32, parts ...[]byte) uint32 {
	var s [4]byte
	binary.LittleEndian.PutUint32(s[:], salt)
	c := crc32.Update(0, castagnoli, s[:])
	for _, p := range parts {
		c = crc32.Update(c, castagnoli, p)
	}
	return c
}

// geometry is the store's fixed layout, recorded in the superblock.
type geometry struct {
	chunkSize  uint32
	originSize int64
	storeSize  int64
	journalOff int64
	journalLen int64
	dataOff    int64
	dataChunks uint64
	uuid       [16]byte
	formatted  int64 // unix ns, 0 if unknown
	transient  bool  // flag: formatted transient, not openable
	version    uint32
	metaOff    int64 // metadata region (version 2)
	metaLen    int64
	// maxVolSize bounds every volume's size (0: the origin's size, for a
	// store formatted before it was recorded); noOrigin: Format was given
	// no origin device.
	maxVolSize int64
	noOrigin   bool
	idOff      int64 // identity region (identity.go); 0 in older stores
	idLen      int64
}

// flagNoOrigin (pool flags, byte 128) marks a store without an origin.
const flagNoOrigin = 1

// volumeBound is the largest size any volume of the store may have.
func (g *geometry) volumeBound() int64 {
	if g.maxVolSize == 0 {
		return g.originSize
	}
	return g.maxVolSize
}

// flagTransient marks a store formatted transient: Open refuses it rather
// than find whatever an earlier store left on the device.
const flagTransient = 1

func (g *geometry) encode() []byte {
	b := make([]byte, superblockSize)
	copy(b, superblockMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], g.version)
	le.PutUint64(b[16:], 0)
	le.PutUint32(b[24:], g.chunkSize)
	if g.transient {
		le.PutUint32(b[28:], flagTransient)
	}
	le.PutUint64(b[32:], uint64(g.originSize))
	le.PutUint64(b[40:], uint64(g.storeSize))
	le.PutUint64(b[48:], uint64(g.journalOff))
	le.PutUint64(b[56:], uint64(g.journalLen))
	le.PutUint64(b[64:], uint64(g.dataOff))
	le.PutUint64(b[72:], g.dataChunks)
	copy(b[80:96], g.uuid[:])
	le.PutUint64(b[96:], uint64(g.formatted))
	le.PutUint64(b[104:], uint64(g.metaOff))
	le.PutUint64(b[112:], uint64(g.metaLen))
	le.PutUint64(b[120:], uint64(g.maxVolSize))
	if g.noOrigin {
		le.PutUint32(b[128:], flagNoOrigin)
	}
	le.PutUint64(b[160:], uint64(g.idOff))
	le.PutUint64(b[168:], uint64(g.idLen))
	le.PutUint32(b[12:], checksum(saltSuperblock, b))
	return b
}

// decodeSuperblock parses and validates a superblock image. It never
// panics; every failure wraps ErrCorrupt with the offset that was wrong.
func decodeSuperblock(b []byte) (geometry, error) {
	var g geometry
	bad := func(off int, format string, args ...any) error {
		return fmt.Errorf("%w: superblock at store offset 0, byte %d: %s", ErrCorrupt, off, fmt.Sprintf(format, args...))
	}
	if len(b) < superblockSize {
		return g, bad(0, "short block of %d bytes", len(b))
	}
	if len(b) > superblockSize {
		b = b[:superblockSize]
	}
	if string(b[:8]) != superblockMagic {
		return g, bad(0, "bad magic %q", b[:8])
	}
	le := binary.LittleEndian
	g.version = le.Uint32(b[8:])
	if g.version != superblockVersion && g.version != oldSuperblockVersion {
		return g, bad(8, "unsupported version %d", g.version)
	}
	var tmp [superblockSize]byte
	copy(tmp[:], b)
	le.PutUint32(tmp[12:], 0)
	if want, got := checksum(saltSuperblock, tmp[:]), le.Uint32(b[12:]); want != got {
		return g, bad(12, "checksum %#x, want %#x", got, want)
	}
	if loc := le.Uint64(b[16:]); loc != 0 {
		return g, bad(16, "block records location %d, read at 0", loc)
	}
	g.chunkSize = le.Uint32(b[24:])
	if g.chunkSize < minChunkSize || g.chunkSize > maxChunkSize || g.chunkSize&(g.chunkSize-1) != 0 {
		return g, bad(24, "chunk size %d", g.chunkSize)
	}
	if f := le.Uint32(b[28:]); f&^flagTransient != 0 {
		return g, bad(28, "unknown flags %#x", f)
	}
	g.transient = le.Uint32(b[28:])&flagTransient != 0
	g.originSize = int64(le.Uint64(b[32:]))
	g.storeSize = int64(le.Uint64(b[40:]))
	g.journalOff = int64(le.Uint64(b[48:]))
	g.journalLen = int64(le.Uint64(b[56:]))
	g.dataOff = int64(le.Uint64(b[64:]))
	g.dataChunks = le.Uint64(b[72:])
	copy(g.uuid[:], b[80:96])
	g.formatted = int64(le.Uint64(b[96:]))
	g.metaOff = int64(le.Uint64(b[104:]))
	g.metaLen = int64(le.Uint64(b[112:]))
	g.maxVolSize = int64(le.Uint64(b[120:]))
	if f := le.Uint32(b[128:]); f&^flagNoOrigin != 0 {
		return g, bad(128, "unknown pool flags %#x", f)
	}
	g.noOrigin = le.Uint32(b[128:])&flagNoOrigin != 0
	g.idOff = int64(le.Uint64(b[160:]))
	g.idLen = int64(le.Uint64(b[168:]))
	cs := int64(g.chunkSize)
	regionEnd := g.journalOff + g.journalLen
	if g.version == superblockVersion && !g.transient {
		regionEnd = g.metaOff + g.metaLen
	}
	switch {
	case g.originSize < 0 || g.originSize > 1<<60 || (g.originSize == 0) != g.noOrigin:
		return g, bad(32, "origin size %d (no origin: %v)", g.originSize, g.noOrigin)
	case g.maxVolSize != 0 && (g.maxVolSize < g.originSize || g.maxVolSize > maxVolumeBound || g.maxVolSize%cs != 0):
		return g, bad(120, "largest volume size %d (origin %d bytes)", g.maxVolSize, g.originSize)
	case g.maxVolSize == 0 && g.noOrigin:
		return g, bad(120, "no origin and no volume size bound")
	case g.storeSize <= superblockSize || g.storeSize > 1<<60:
		return g, bad(40, "store size %d", g.storeSize)
	case g.idOff != 0 && g.idOff != superblockSize || g.idLen != 0 && g.idLen != identityLen || (g.idOff == 0) != (g.idLen == 0):
		return g, bad(160, "identity region %d+%d", g.idOff, g.idLen)
	case g.journalOff != superblockSize+g.idLen || g.journalLen < 0 || g.journalLen > g.storeSize:
		return g, bad(48, "journal region %d+%d", g.journalOff, g.journalLen)
	case g.version == oldSuperblockVersion && (g.metaOff != 0 || g.metaLen != 0):
		return g, bad(104, "version 1 with a metadata region")
	case g.version == superblockVersion && !g.transient &&
		(g.metaOff != g.journalOff+g.journalLen || g.metaOff%4096 != 0 || g.metaLen < minMetaBytes || g.metaLen%4096 != 0 || g.metaLen > g.storeSize):
		return g, bad(104, "metadata region %d+%d", g.metaOff, g.metaLen)
	case g.dataOff < regionEnd || g.dataOff%cs != 0 || g.dataOff > g.storeSize:
		return g, bad(64, "data region offset %d", g.dataOff)
	case g.dataChunks > uint64(g.storeSize-g.dataOff)/uint64(cs):
		return g, bad(72, "%d data chunks do not fit a store of %d bytes", g.dataChunks, g.storeSize)
	}
	return g, nil
}
