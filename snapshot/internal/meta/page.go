// Package meta is the store's paged metadata: a copy-on-write (shadowing)
// B+tree of extents on a region of a device, a bounded cache of decoded
// nodes, space maps for metadata pages and data chunks, and a superblock
// written in two copies. docs/metadata.md describes the design; this file
// holds the page header every page type shares.
//
// Common page header (every page is PageSize bytes):
//
//	offset size field
//	0      4    CRC32C of bytes 4..PageSize-1, seeded per page type
//	4      2    page type (typeSuper ... typeIndex)
//	6      2    entry count (meaning per type)
//	8      8    the page's own page number in the region
//	16     8    transaction id that wrote it
//	24     2    tree level (0 = leaf; 0 for non-tree pages)
//	26     6    zero
//	32     ...  body, per type
package meta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// PageSize is the size of every metadata page.
const PageSize = 4096

const headerSize = 32

// Page types; the checksum seed differs per type, so a page of one type can
// never validate as another.
const (
	typeSuper       = 1
	typeChunkBranch = 2
	typeChunkLeaf   = 3
	typeEpochBranch = 4
	typeEpochLeaf   = 5
	typeBitmap      = 6
	typeIndex       = 7
	typeMax         = 7
)

var (
	// ErrCorrupt reports metadata that failed validation; it is wrapped
	// with the page number and the reason.
	ErrCorrupt = errors.New("meta: corrupt metadata")
	// ErrNoSpace reports that the metadata region or the data space is
	// full; nothing was changed.
	ErrNoSpace = errors.New("meta: no space")
	// ErrExists reports a Put of a key that is already present.
	ErrExists = errors.New("meta: key exists")
	// ErrNotFound reports a Delete of a key that is not present.
	ErrNotFound = errors.New("meta: key not found")
	// ErrReadOnly reports a change attempted on a read-only Meta.
	ErrReadOnly = errors.New("meta: read-only")
	// ErrClosed reports use after Close.
	ErrClosed = errors.New("meta: closed")
	// ErrFailed reports that an earlier device error left the
	// transaction unusable; reopen to continue from the last commit.
	ErrFailed = errors.New("meta: failed by an earlier device error")
	// ErrInvalid reports a bad argument.
	ErrInvalid = errors.New("meta: invalid argument")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// seed is the per-type checksum seed.
func seed(typ uint16) uint32 { return 0x6d657461 ^ uint32(typ)*0x9e3779b1 }

// header is the decoded common page header.
type header struct {
	typ   uint16
	count uint16
	loc   uint64
	tx    uint64
	level uint16
}

// seal writes the header into p and then the checksum over the rest.
func seal(p []byte, h header) {
	binary.LittleEndian.PutUint16(p[4:], h.typ)
	binary.LittleEndian.PutUint16(p[6:], h.count)
	binary.LittleEndian.PutUint64(p[8:], h.loc)
	binary.LittleEndian.PutUint64(p[16:], h.tx)
	binary.LittleEndian.PutUint16(p[24:], h.level)
	clear(p[26:32])
	binary.LittleEndian.PutUint32(p[0:], crc32.Update(seed(h.typ), castagnoli, p[4:]))
}

// corrupt wraps ErrCorrupt with the page and a reason.
func corrupt(loc uint64, format string, args ...any) error {
	return fmt.Errorf("%w: page %d: %s", ErrCorrupt, loc, fmt.Sprintf(format, args...))
}

// openPage validates the common header of p read from page loc: size,
// checksum for the expected type, type, location and transaction id
// (wantTx 0 accepts any). It is the first step of every per-type validator.
func openPage(p []byte, loc uint64, typ uint16, wantTx uint64) (header, error) {
	if len(p) != PageSize {
		return header{}, corrupt(loc, "page of %d bytes", len(p))
	}
	var h header
	h.typ = binary.LittleEndian.Uint16(p[4:])
	if h.typ != typ {
		return h, corrupt(loc, "type %d, want %d", h.typ, typ)
	}
	if sum := crc32.Update(seed(typ), castagnoli, p[4:]); sum != binary.LittleEndian.Uint32(p) {
		return h, corrupt(loc, "checksum mismatch (torn or damaged page)")
	}
	h.count = binary.LittleEndian.Uint16(p[6:])
	h.loc = binary.LittleEndian.Uint64(p[8:])
	h.tx = binary.LittleEndian.Uint64(p[16:])
	h.level = binary.LittleEndian.Uint16(p[24:])
	if h.loc != loc {
		return h, corrupt(loc, "page claims location %d (misdirected write)", h.loc)
	}
	if wantTx != 0 && h.tx != wantTx {
		return h, corrupt(loc, "transaction %d, want %d (stale or lost write)", h.tx, wantTx)
	}
	for _, b := range p[26:32] {
		if b != 0 {
			return h, corrupt(loc, "reserved header bytes not zero")
		}
	}
	return h, nil
}

// ptr is an on-disk reference to a page: its number and the transaction
// that wrote it, so a reader detects a page that is older than expected.
type ptr struct {
	loc uint64
	tx  uint64
}

func (p ptr) isNil() bool { return p.loc == 0 }

func zigzag(v int64) uint64 { return uint64(v<<1) ^ uint64(v>>63) }

func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }
