package clone

// On-disk formats of a clone's metadata device. The device holds the
// superblock in its first 4 KiB and a journal (package journal) in the rest.
// The journal carries the hydration records and the bitmap checkpoints
// encoded below; it adds its own framing, sequence numbers and checksums.
//
// Superblock, at byte 0 of the metadata device (superblockSize bytes, the
// rest of the 4 KiB zero), all integers little-endian:
//
//	off  size  field
//	  0     8  magic "BSNAPCLN"
//	  8     4  version (1)
//	 12     4  flags (0; reserved)
//	 16     8  own location: byte offset of this superblock (0)
//	 24     8  region size, bytes (power of two, 4 KiB .. 1 GiB)
//	 32     8  source size, bytes (the clone's size)
//	 40     8  destination size, bytes (>= source size)
//	 48     4  source block size
//	 52     4  destination block size
//	 56     8  region count = ceil(source size / region size)
//	 64     8  journal offset on the metadata device, bytes
//	 72     8  journal length, bytes
//	 80     8  journal checkpoint slot size, bytes
//	 88     4  crc32c (Castagnoli) of bytes [0, 88), seeded with saltSuper
//
// Journal record payload (one record per commit batch, at most maxPayload):
//
//	off  size  field
//	  0     1  type: recHydrated (1) or recSession (2)
//	recHydrated:
//	  1     v  uvarint n: number of ranges (>= 1)
//	  .     v  n times: uvarint gap from the previous range's end (the
//	           first from region 0), uvarint length (>= 1) in regions
//	recSession:
//	  1     1  0: metadata sync on (clean); 1: an unsynced session is open
//
// Bitmap checkpoint (streamed to a journal checkpoint slot):
//
//	off  size  field
//	  0     8  magic "BSCLBMAP"
//	  8     8  region count N (must match the superblock)
//	 16     8  number of set bits (must match the words)
//	 24     8  flags: bit 0 = an unsynced session is open
//	 32  8*W  W = ceil(N/64) little-endian words; bit i of word k is region
//	           64k+i; bits >= N are zero
//	  .     4  crc32c of everything before, seeded with saltBitmap

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"

	"github.com/bits-and-blooms/bitset"
)

const (
	superMagic     = "BSNAPCLN"
	superVersion   = 1
	superblockSize = 92
	// superArea is the space the superblock occupies on the metadata
	// device; the journal starts after it.
	superArea = 4096

	bitmapMagic  = "BSCLBMAP"
	bitmapHeader = 32

	recHydrated = 1
	recSession  = 2

	// maxPayload bounds one journal record; a commit with more ranges than
	// fit is split into several records.
	maxPayload = 16 << 10

	// Checksum salts, one per structure type, so a block of one type is
	// never accepted as another.
	saltSuper  = 0x434c4e53 // "CLNS"
	saltBitmap = 0x434c4e42 // "CLNB"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crcOf(salt uint32, p []byte) uint32 { return crc32.Update(salt, castagnoli, p) }

// geometry is what the superblock records.
type geometry struct {
	RegionSize     int64
	SourceSize     int64
	DestSize       int64
	SourceBlock    uint32
	DestBlock      uint32
	Regions        uint64
	JournalOffset  int64
	JournalLength  int64
	CheckpointSize int64
}

// regionCount is ceil(size / regionSize).
func regionCount(size, regionSize int64) uint64 {
	return uint64((size + regionSize - 1) / regionSize)
}

func (g geometry) encode() []byte {
	b := make([]byte, superArea)
	copy(b[0:8], superMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], superVersion)
	le.PutUint32(b[12:], 0)
	le.PutUint64(b[16:], 0)
	le.PutUint64(b[24:], uint64(g.RegionSize))
	le.PutUint64(b[32:], uint64(g.SourceSize))
	le.PutUint64(b[40:], uint64(g.DestSize))
	le.PutUint32(b[48:], g.SourceBlock)
	le.PutUint32(b[52:], g.DestBlock)
	le.PutUint64(b[56:], g.Regions)
	le.PutUint64(b[64:], uint64(g.JournalOffset))
	le.PutUint64(b[72:], uint64(g.JournalLength))
	le.PutUint64(b[80:], uint64(g.CheckpointSize))
	le.PutUint32(b[88:], crcOf(saltSuper, b[:88]))
	return b
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// decodeSuperblock parses and validates a superblock read from byte 0 of a
// metadata device of metaSize bytes. It checks internal consistency only;
// the comparison with the devices given to Open is checkGeometry's.
func decodeSuperblock(b []byte, metaSize int64) (geometry, error) {
	var g geometry
	if len(b) < superblockSize {
		return g, corruptf("superblock at 0: %d bytes, need %d", len(b), superblockSize)
	}
	if string(b[0:8]) != superMagic {
		return g, corruptf("superblock at 0: bad magic %q", b[0:8])
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[88:]), crcOf(saltSuper, b[:88]); got != want {
		return g, corruptf("superblock at 0: checksum %#x, want %#x", got, want)
	}
	if v := le.Uint32(b[8:]); v != superVersion {
		return g, corruptf("superblock at 0: version %d, want %d", v, superVersion)
	}
	if loc := le.Uint64(b[16:]); loc != 0 {
		return g, corruptf("superblock at 0: records location %d (misdirected)", loc)
	}
	g = geometry{
		RegionSize:     int64(le.Uint64(b[24:])),
		SourceSize:     int64(le.Uint64(b[32:])),
		DestSize:       int64(le.Uint64(b[40:])),
		SourceBlock:    le.Uint32(b[48:]),
		DestBlock:      le.Uint32(b[52:]),
		Regions:        le.Uint64(b[56:]),
		JournalOffset:  int64(le.Uint64(b[64:])),
		JournalLength:  int64(le.Uint64(b[72:])),
		CheckpointSize: int64(le.Uint64(b[80:])),
	}
	switch {
	case g.RegionSize < MinRegionSize || g.RegionSize > MaxRegionSize || g.RegionSize&(g.RegionSize-1) != 0:
		return g, corruptf("superblock at 0: region size %d", g.RegionSize)
	case g.SourceSize <= 0 || g.DestSize < g.SourceSize:
		return g, corruptf("superblock at 0: source size %d, destination size %d", g.SourceSize, g.DestSize)
	case !validBlock(g.SourceBlock) || !validBlock(g.DestBlock):
		return g, corruptf("superblock at 0: block sizes %d, %d", g.SourceBlock, g.DestBlock)
	case g.Regions != regionCount(g.SourceSize, g.RegionSize):
		return g, corruptf("superblock at 0: %d regions for %d bytes of %d", g.Regions, g.SourceSize, g.RegionSize)
	case g.JournalOffset != superArea || g.JournalLength <= 0 || g.JournalLength > metaSize-g.JournalOffset:
		return g, corruptf("superblock at 0: journal at %d+%d on a %d-byte device", g.JournalOffset, g.JournalLength, metaSize)
	case g.CheckpointSize <= 0 || g.CheckpointSize > g.JournalLength:
		return g, corruptf("superblock at 0: checkpoint slot %d", g.CheckpointSize)
	}
	return g, nil
}

func validBlock(bs uint32) bool { return bs == 512 || bs == 4096 }

// span is a run of regions [start, start+n).
type span struct{ start, n uint64 }

// spansPerRecord is the most spans one record holds: each costs at most
// 2*MaxVarintLen64 bytes, so a record stays within maxPayload.
const spansPerRecord = (maxPayload - 1 - binary.MaxVarintLen64) / (2 * binary.MaxVarintLen64)

// encodeHydrated encodes a recHydrated record of spans (sorted, disjoint,
// 1..spansPerRecord of them).
func encodeHydrated(spans []span) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(spans)*2*binary.MaxVarintLen64)
	b = append(b, recHydrated)
	b = binary.AppendUvarint(b, uint64(len(spans)))
	var end uint64
	for _, s := range spans {
		b = binary.AppendUvarint(b, s.start-end)
		b = binary.AppendUvarint(b, s.n)
		end = s.start + s.n
	}
	return b
}

func encodeSession(unsynced bool) []byte {
	if unsynced {
		return []byte{recSession, 1}
	}
	return []byte{recSession, 0}
}

// record is a decoded journal payload.
type record struct {
	kind     byte
	spans    []span
	unsynced bool
}

// decodeRecord parses a journal payload for a clone of the given number of
// regions. Allocation is bounded by len(p).
func decodeRecord(p []byte, regions uint64, seq uint64) (record, error) {
	var r record
	if len(p) < 2 {
		return r, corruptf("record %d: %d bytes", seq, len(p))
	}
	r.kind = p[0]
	switch r.kind {
	case recSession:
		if len(p) != 2 || p[1] > 1 {
			return r, corruptf("record %d: bad session record", seq)
		}
		r.unsynced = p[1] == 1
		return r, nil
	case recHydrated:
	default:
		return r, corruptf("record %d: unknown type %d", seq, r.kind)
	}
	rd := bytes.NewReader(p[1:])
	n, err := binary.ReadUvarint(rd)
	if err != nil || n == 0 || n > uint64(len(p)) {
		return r, corruptf("record %d: bad span count", seq)
	}
	r.spans = make([]span, 0, n)
	var end uint64
	for i := uint64(0); i < n; i++ {
		gap, err1 := binary.ReadUvarint(rd)
		length, err2 := binary.ReadUvarint(rd)
		if err1 != nil || err2 != nil {
			return r, corruptf("record %d: span %d truncated", seq, i)
		}
		if length == 0 || gap > regions || length > regions || end+gap > regions-length {
			return r, corruptf("record %d: span %d (+%d, %d) outside %d regions", seq, i, gap, length, regions)
		}
		s := span{start: end + gap, n: length}
		r.spans = append(r.spans, s)
		end = s.start + s.n
	}
	if rd.Len() != 0 {
		return r, corruptf("record %d: %d trailing bytes", seq, rd.Len())
	}
	return r, nil
}

// writeBitmap streams a checkpoint of bm (of the given region count) to w.
func writeBitmap(w io.Writer, bm *bitset.BitSet, regions uint64, unsynced bool) error {
	crc := uint32(saltBitmap)
	bw := bufio.NewWriterSize(w, 64<<10)
	var hdr [bitmapHeader]byte
	copy(hdr[:8], bitmapMagic)
	le := binary.LittleEndian
	le.PutUint64(hdr[8:], regions)
	words := bm.Words()
	W := int((regions + 63) / 64)
	var count uint64
	for i := 0; i < W && i < len(words); i++ {
		count += uint64(bits.OnesCount64(words[i]))
	}
	le.PutUint64(hdr[16:], count)
	var flags uint64
	if unsynced {
		flags |= 1
	}
	le.PutUint64(hdr[24:], flags)
	crc = crc32.Update(crc, castagnoli, hdr[:])
	if _, err := bw.Write(hdr[:]); err != nil {
		return err
	}
	var wb [8]byte
	for i := 0; i < W; i++ {
		var x uint64
		if i < len(words) {
			x = words[i]
		}
		le.PutUint64(wb[:], x)
		crc = crc32.Update(crc, castagnoli, wb[:])
		if _, err := bw.Write(wb[:]); err != nil {
			return err
		}
	}
	le.PutUint32(wb[:4], crc)
	if _, err := bw.Write(wb[:4]); err != nil {
		return err
	}
	return bw.Flush()
}

// readBitmap decodes a checkpoint for a clone of the given region count.
// It allocates the bitmap for regions (the superblock's geometry, already
// validated), never for a count read from r.
func readBitmap(r io.Reader, regions uint64) (*bitset.BitSet, bool, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var hdr [bitmapHeader]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return nil, false, corruptf("bitmap checkpoint header: %v", err)
	}
	if string(hdr[:8]) != bitmapMagic {
		return nil, false, corruptf("bitmap checkpoint: bad magic %q", hdr[:8])
	}
	le := binary.LittleEndian
	if n := le.Uint64(hdr[8:]); n != regions {
		return nil, false, corruptf("bitmap checkpoint: %d regions, want %d", n, regions)
	}
	count := le.Uint64(hdr[16:])
	flags := le.Uint64(hdr[24:])
	if flags&^1 != 0 {
		return nil, false, corruptf("bitmap checkpoint: unknown flags %#x", flags)
	}
	crc := crc32.Update(saltBitmap, castagnoli, hdr[:])
	W := int((regions + 63) / 64)
	words := make([]uint64, W)
	var wb [8]byte
	var got uint64
	for i := range words {
		if _, err := io.ReadFull(br, wb[:]); err != nil {
			return nil, false, corruptf("bitmap checkpoint word %d: %v", i, err)
		}
		crc = crc32.Update(crc, castagnoli, wb[:])
		words[i] = le.Uint64(wb[:])
		got += uint64(bits.OnesCount64(words[i]))
	}
	if _, err := io.ReadFull(br, wb[:4]); err != nil {
		return nil, false, corruptf("bitmap checkpoint checksum: %v", err)
	}
	if c := le.Uint32(wb[:4]); c != crc {
		return nil, false, corruptf("bitmap checkpoint: checksum %#x, want %#x", c, crc)
	}
	if rem := regions % 64; rem != 0 && W > 0 && words[W-1]>>rem != 0 {
		return nil, false, corruptf("bitmap checkpoint: bits set past region %d", regions)
	}
	if got != count {
		return nil, false, corruptf("bitmap checkpoint: %d bits set, header says %d", got, count)
	}
	return bitset.FromWithLength(uint(regions), words), flags&1 != 0, nil
}

// ErrCorrupt reports metadata that fails validation; it is wrapped with the
// location.
var ErrCorrupt = errors.New("clone: corrupt metadata")
