// Package diffstream is the blocksnap diff stream: a self-describing,
// checksummed byte stream that carries the difference between two
// snapshots of a volume (an incremental), or a whole volume (a full, sparse
// base export), in the manner of `zfs send -i` and `rbd export-diff`.
//
// Export writes a stream from a source volume and a list of changed
// extents; Reader decodes one, verifying every record; Apply writes one
// onto a target device, idempotently and resumably, keeping a small state
// file beside the target that says which snapshot the target holds.
//
// Import graph: diffstream imports blockdev only. Package snapshot imports
// diffstream (snapshot.Store.ExportDiff drives Export from a store's diff),
// never the other way round; the extent type they share, blockdev.Extent,
// lives below both (Extent here is an alias of it).
//
// # Layout
//
// All integers are little-endian. A stream is a header, then records, the
// last of which is END.
//
// Header (H bytes, 44 <= H <= 4096):
//
//	offset  size  field
//	0       8     magic "BSNPDIFF"
//	8       2     version: 1, or 2 for a compressed stream; a reader
//	              refuses a version it does not know, naming both
//	10      2     H, the header length including the CRC; fields a newer
//	              writer appends before the CRC are skipped by older readers
//	12      4     flags (FlagFull: a base export, From is empty; FlagZstd,
//	              version 2 only: compressed records); unknown flags are
//	              refused
//	16      8     volume size in bytes
//	24      4     block size in bytes (alignment of every record)
//	28      4     chunk size in bytes of the store that produced the stream
//	              (informational; 0 when unknown)
//	32      2+n   From ID   (u16 length n <= 1024, then n opaque bytes)
//	.       2+n   From name (u16 length, UTF-8)
//	.       2+n   To ID
//	.       2+n   To name
//	.       ...   extension fields, up to H-4 (none in streams written
//	              before volume UUIDs; see below)
//	H-4     4     CRC32C (Castagnoli) of bytes [0, H-4)
//
// Extension fields carry what later writers add to the header without a
// new version, so that readers of either age read the stream: each is
//
//	offset  size  field
//	0       2     tag
//	2       2     length n (<= 1024)
//	4       n     value
//
// and they fill the space between To name and the CRC exactly (a field
// that runs past it is corrupt). A reader skips tags it does not know;
// readers from before extension fields skip the whole area. Tags:
//
//	tag  field
//	1    From UUID: the volume's stable UUID, in canonical text form
//	2    To UUID
//
// An identity whose UUID is empty (every stream written before them) is
// compared by its ID alone (see Identity.Same).
//
// Version 2 differs from version 1 only in that, with FlagZstd, every byte
// after the header is one zstd stream (RFC 8878, window at most 8 MiB)
// that decompresses to the records exactly as version 1 lays them out; the
// checksums below are of the decompressed bytes. Writers emit version 1
// when they do not compress, so uncompressed streams stay readable by
// readers that know version 1 only; those refuse a version 2 stream with
// an error naming the versions.
//
// Record k (k = 0, 1, ... counting from the first record after the header):
//
//	offset  size  field
//	0       1     type
//	1       1     flags (0; reserved)
//	2       2     reserved (0)
//	4       4     payload length L (<= MaxPayload)
//	8       L     payload
//	8+L     4     CRC32C of (k as u64 || bytes [0, 8+L)): the index makes a
//	              dropped, repeated or reordered record fail its check
//
// Payloads by type:
//
//	type  name  payload
//	1     DATA  offset u64, then L-8 bytes of data (> 0, a multiple of the
//	            block size, at most MaxData)
//	2     ZERO  offset u64, length u64 (> 0, a multiple of the block size):
//	            the range reads as zeros
//	255   END   records u64 (records before END), data bytes u64, zero
//	            bytes u64, stream CRC32C u32 of every byte of the stream
//	            before this record (header included)
//	other       unknown: verified by its CRC and skipped, so that newer
//	            writers can add record types older readers ignore
//
// A full export covers every byte of the volume with DATA or ZERO records,
// so applying it onto any target of the right size (blank or dirty) leaves
// the target equal to the exported snapshot.
package diffstream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Magic opens every stream.
const Magic = "BSNPDIFF"

// Stream format versions this package writes and reads.
const (
	// Version1 is the uncompressed format.
	Version1 = 1
	// Version2 adds compression (FlagZstd).
	Version2 = 2
	// Version is the newest version this package knows.
	Version = Version2
)

// Header flags.
const (
	// FlagFull marks a full (base) export: From is empty and the records
	// cover the whole volume.
	FlagFull uint32 = 1 << 0
	// FlagZstd marks a version 2 stream whose records are zstd-compressed.
	// A writer given it writes version 2.
	FlagZstd uint32 = 1 << 1

	knownFlags = FlagFull | FlagZstd
)

// Header extension tags (see the layout).
const (
	extFromUUID uint16 = 1
	extToUUID   uint16 = 2
)

// Record types.
const (
	TypeData uint8 = 1
	TypeZero uint8 = 2
	TypeEnd  uint8 = 255
)

// Size limits.
const (
	// MaxData is the most data bytes one DATA record carries.
	MaxData = 4 << 20
	// MaxPayload is the largest payload a record of any type may have.
	MaxPayload = MaxData + 8
	// MaxIdentity is the longest ID or name in a header.
	MaxIdentity = 1024
	// MaxHeader is the largest header length a reader accepts.
	MaxHeader = 4096

	headerFixed   = 32
	minHeader     = headerFixed + 4*2 + 4
	recordHeader  = 8
	recordTrailer = 4
	endPayload    = 8 + 8 + 8 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors. Callers test them with errors.Is.
var (
	// ErrCorrupt: the stream is damaged, truncated or malformed. The error
	// is a *CorruptError carrying the byte offset.
	ErrCorrupt = errors.New("diffstream: corrupt stream")
	// ErrVersion: the stream was written by a newer, incompatible version.
	ErrVersion = errors.New("diffstream: unsupported stream version")
	// ErrMismatch: the stream does not fit the target (the target is not
	// at the stream's From snapshot, or is partly applied from another
	// stream, or its geometry differs).
	ErrMismatch = errors.New("diffstream: stream does not match target")
)

// CorruptError is a damaged stream, with where the damage was found.
type CorruptError struct {
	// Offset is the byte offset in the stream of the header or record that
	// failed its check.
	Offset int64
	// Record is the record index, or -1 for the header.
	Record int64
	Reason string
}

func (e *CorruptError) Error() string {
	if e.Record < 0 {
		return fmt.Sprintf("diffstream: corrupt stream: header at byte %d: %s", e.Offset, e.Reason)
	}
	return fmt.Sprintf("diffstream: corrupt stream: record %d at byte %d: %s", e.Record, e.Offset, e.Reason)
}

// Unwrap makes errors.Is(err, ErrCorrupt) hold.
func (e *CorruptError) Unwrap() error { return ErrCorrupt }

// Identity names a snapshot: an opaque ID (stable, unique within its
// store), the volume's UUID (unique across stores; empty in streams
// written before UUIDs), and a human-readable name. Apply compares
// identities with Same.
type Identity struct {
	ID   string `json:"id"`
	Name string `json:"name,omitempty"`
	UUID string `json:"uuid,omitempty"`
}

// IsZero reports whether the identity is empty (no snapshot).
func (i Identity) IsZero() bool { return i.ID == "" && i.Name == "" && i.UUID == "" }

// Same reports whether i and o name the same snapshot: by UUID when both
// have one, else by ID (an identity from an older stream or state file
// has no UUID). Names are for people and never compared.
func (i Identity) Same(o Identity) bool {
	if i.UUID != "" && o.UUID != "" {
		return i.UUID == o.UUID
	}
	return i.ID == o.ID
}

func (i Identity) String() string {
	switch {
	case i.IsZero():
		return "(empty)"
	case i.Name == "" && i.UUID == "":
		return i.ID
	case i.UUID == "":
		return fmt.Sprintf("%s (%s)", i.Name, i.ID)
	}
	return fmt.Sprintf("%s (%s, uuid %s)", i.Name, i.ID, i.UUID)
}

// Header describes a stream.
type Header struct {
	Version    int
	Flags      uint32
	VolumeSize int64 // bytes
	BlockSize  int   // bytes; every record is aligned to it
	ChunkSize  int   // bytes; informational, 0 if unknown
	From, To   Identity
}

// Full reports whether the stream is a full (base) export.
func (h Header) Full() bool { return h.Flags&FlagFull != 0 }

// Compressed reports whether the stream's records are zstd-compressed.
func (h Header) Compressed() bool { return h.Flags&FlagZstd != 0 }

func (h Header) validate() error {
	if h.BlockSize < 512 || h.BlockSize&(h.BlockSize-1) != 0 || h.BlockSize > MaxData {
		return fmt.Errorf("block size %d is not a power of two in [512, %d]", h.BlockSize, MaxData)
	}
	if h.VolumeSize < 0 || h.VolumeSize%int64(h.BlockSize) != 0 {
		return fmt.Errorf("volume size %d is not a multiple of block size %d", h.VolumeSize, h.BlockSize)
	}
	if h.ChunkSize < 0 {
		return fmt.Errorf("chunk size %d is negative", h.ChunkSize)
	}
	if h.Flags&^knownFlags != 0 {
		return fmt.Errorf("unknown flags %#x", h.Flags&^knownFlags)
	}
	if (h.Version == Version2) != h.Compressed() {
		return fmt.Errorf("version %d with flags %#x: compression is version 2 and only that", h.Version, h.Flags)
	}
	if h.To.ID == "" {
		return errors.New("the To snapshot has no ID")
	}
	if h.Full() != (h.From.ID == "") {
		return errors.New("a full export has no From and an incremental one must have one")
	}
	if h.Full() && h.From.UUID != "" {
		return errors.New("a full export has a From UUID")
	}
	n := minHeader
	for i, s := range []string{h.From.ID, h.From.Name, h.To.ID, h.To.Name, h.From.UUID, h.To.UUID} {
		if len(s) > MaxIdentity {
			return fmt.Errorf("identity of %d bytes exceeds %d", len(s), MaxIdentity)
		}
		if n += len(s); i >= 4 && s != "" {
			n += 4 // an extension field's tag and length
		}
	}
	if n > MaxHeader {
		// Readers refuse a longer header: the stream would be unreadable.
		return fmt.Errorf("identities make a header of %d bytes, more than %d", n, MaxHeader)
	}
	return nil
}

// encodeHeader appends the encoded header to b.
func encodeHeader(b []byte, h Header) []byte {
	start := len(b)
	b = append(b, Magic...)
	b = binary.LittleEndian.AppendUint16(b, uint16(h.Version))
	b = binary.LittleEndian.AppendUint16(b, 0) // length, patched below
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	b = binary.LittleEndian.AppendUint64(b, uint64(h.VolumeSize))
	b = binary.LittleEndian.AppendUint32(b, uint32(h.BlockSize))
	b = binary.LittleEndian.AppendUint32(b, uint32(h.ChunkSize))
	for _, s := range []string{h.From.ID, h.From.Name, h.To.ID, h.To.Name} {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	// Extension fields only when set, so a stream without UUIDs is byte
	// for byte what writers before them wrote.
	for _, f := range []struct {
		tag uint16
		v   string
	}{{extFromUUID, h.From.UUID}, {extToUUID, h.To.UUID}} {
		if f.v != "" {
			b = binary.LittleEndian.AppendUint16(b, f.tag)
			b = binary.LittleEndian.AppendUint16(b, uint16(len(f.v)))
			b = append(b, f.v...)
		}
	}
	binary.LittleEndian.PutUint16(b[start+10:], uint16(len(b)-start+4))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// decodeHeader decodes a complete header of length len(b) whose length
// field has been read already. It never panics.
func decodeHeader(b []byte) (Header, error) {
	bad := func(format string, args ...any) (Header, error) {
		return Header{}, &CorruptError{Offset: 0, Record: -1, Reason: fmt.Sprintf(format, args...)}
	}
	n := len(b)
	if got, want := crc32.Checksum(b[:n-4], castagnoli), binary.LittleEndian.Uint32(b[n-4:]); got != want {
		return bad("checksum %#08x, want %#08x", got, want)
	}
	h := Header{
		Version:    int(binary.LittleEndian.Uint16(b[8:])),
		Flags:      binary.LittleEndian.Uint32(b[12:]),
		VolumeSize: int64(binary.LittleEndian.Uint64(b[16:])),
		BlockSize:  int(binary.LittleEndian.Uint32(b[24:])),
		ChunkSize:  int(binary.LittleEndian.Uint32(b[28:])),
	}
	pos := headerFixed
	var ids [4]string
	for i := range ids {
		if pos+2 > n-4 {
			return bad("identity field %d runs past the header", i)
		}
		l := int(binary.LittleEndian.Uint16(b[pos:]))
		pos += 2
		if l > MaxIdentity || pos+l > n-4 {
			return bad("identity field %d of %d bytes runs past the header", i, l)
		}
		ids[i] = string(b[pos : pos+l])
		pos += l
	}
	h.From = Identity{ID: ids[0], Name: ids[1]}
	h.To = Identity{ID: ids[2], Name: ids[3]}
	for pos < n-4 {
		if pos+4 > n-4 {
			return bad("extension field at byte %d runs past the header", pos)
		}
		tag, l := binary.LittleEndian.Uint16(b[pos:]), int(binary.LittleEndian.Uint16(b[pos+2:]))
		if l > MaxIdentity || pos+4+l > n-4 {
			return bad("extension field %d of %d bytes at byte %d runs past the header", tag, l, pos)
		}
		v := string(b[pos+4 : pos+4+l])
		switch tag {
		case extFromUUID:
			h.From.UUID = v
		case extToUUID:
			h.To.UUID = v
		}
		pos += 4 + l
	}
	if int64(h.VolumeSize) < 0 {
		return bad("volume size overflows")
	}
	if err := h.validate(); err != nil {
		return bad("%v", err)
	}
	return h, nil
}

// recordCRC is the checksum of record k's header and payload.
func recordCRC(k int64, hdr, payload []byte) uint32 {
	var idx [8]byte
	binary.LittleEndian.PutUint64(idx[:], uint64(k))
	c := crc32.Update(0, castagnoli, idx[:])
	c = crc32.Update(c, castagnoli, hdr)
	return crc32.Update(c, castagnoli, payload)
}

// Totals sums what a stream carries. END records it; Export returns it;
// Reader checks the stream against it.
type Totals struct {
	Records   int64 `json:"records"`    // records before END, unknown types included
	DataBytes int64 `json:"data_bytes"` // bytes carried by DATA records
	ZeroBytes int64 `json:"zero_bytes"` // bytes covered by ZERO records
}

// Extent is a byte range of a volume: the module's one extent type, shared
// with snapshot.Diff. Zero marks a range the caller knows reads as zeros
// (such as a discarded range), which Export sends as a ZERO record without
// reading the source.
type Extent = blockdev.Extent

// Progress reports a long export or apply. Done counts volume bytes
// covered so far (data and zero records); Total is the stream's volume size
// for a full stream and the sum of extents when known, else 0.
type Progress struct {
	Totals
	Done  int64
	Total int64
}
