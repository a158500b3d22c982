package exception

// The recovery record: a blocksnap extension to the kernel format that
// makes metadata area writes safe against a power cut that tears them. The
// kernel never reads or writes these blocks (they lie beyond every data
// chunk we allocate), so images stay interoperable.
//
// Every change to a metadata area (appending exceptions, or clearing them
// after a merge) rewrites the blocks covering area entries [S, W), where S
// is the first entry of the block holding the first changed entry A, and W
// the end of the last block written. Before those blocks are written, the
// record describing the change is written and flushed (for appends, in the
// same flush that makes the copied data durable). If power fails while the
// area blocks are in flight, a block may hold old, new, or garbage bytes,
// including the bytes of entries before A that were already durable. Open
// compares the area's bytes [S, W) with the record's checksum of what was
// meant to be there; on a mismatch it writes back the block at S from the
// record's pre-image and zeros entries [A, W): an append is undone (its
// writers were never told it succeeded), a clear is finished (the origin
// already holds the merged data).
//
// Layout, the last 2*BlockSize bytes of the COW device (magic 0x63725342,
// "BSrc"), little-endian:
//
//	offset  size meaning
//	0       4    magic 0x63725342
//	4       4    version 1
//	8       8    sequence number of the change
//	16      8    metadata area index
//	24      4    S: first entry of the block rewritten
//	28      4    A: first entry changed
//	32      4    W: end entry of the blocks rewritten
//	36      4    chunk size in sectors (must match the header)
//	40      4    block size = length of the pre-image
//	44      4    CRC-32C of the intended area bytes [S*16, W*16)
//	48      bs   pre-image: the durable block holding entry S before the change
//	48+bs   4    CRC-32C of bytes [0, 48+bs)
//
// A record that fails its checksum describes a change whose first flush
// never completed, so its area blocks were never written: it is ignored.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	recMagic   = 0x63725342
	recVersion = 1
	recFixed   = 48
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// recordSize is the size of the record region for a device block size.
func recordSize(bs int) int64 { return 2 * int64(bs) }

// recordOffset is where the record lives on a device, or -1 when the device
// is too small to spare it.
func recordOffset(size int64, bs int) int64 {
	off := size - recordSize(bs)
	if off < 0 {
		return -1
	}
	return off
}

// record is a decoded recovery record.
type record struct {
	seq     uint64
	area    uint64
	s, a, w uint32
	sectors uint32
	crc     uint32
	pre     []byte
}

func (r *record) encode(dst []byte, bs int) {
	clear(dst)
	binary.LittleEndian.PutUint32(dst[0:], recMagic)
	binary.LittleEndian.PutUint32(dst[4:], recVersion)
	binary.LittleEndian.PutUint64(dst[8:], r.seq)
	binary.LittleEndian.PutUint64(dst[16:], r.area)
	binary.LittleEndian.PutUint32(dst[24:], r.s)
	binary.LittleEndian.PutUint32(dst[28:], r.a)
	binary.LittleEndian.PutUint32(dst[32:], r.w)
	binary.LittleEndian.PutUint32(dst[36:], r.sectors)
	binary.LittleEndian.PutUint32(dst[40:], uint32(bs))
	binary.LittleEndian.PutUint32(dst[44:], r.crc)
	copy(dst[recFixed:recFixed+bs], r.pre)
	binary.LittleEndian.PutUint32(dst[recFixed+bs:], crc32.Checksum(dst[:recFixed+bs], castagnoli))
}

// decodeRecord returns the record in b, or ok false if b holds none that
// checks out.
func decodeRecord(b []byte, bs int) (record, bool) {
	if len(b) < recFixed+bs+4 || binary.LittleEndian.Uint32(b[0:]) != recMagic ||
		binary.LittleEndian.Uint32(b[4:]) != recVersion || binary.LittleEndian.Uint32(b[40:]) != uint32(bs) {
		return record{}, false
	}
	if crc32.Checksum(b[:recFixed+bs], castagnoli) != binary.LittleEndian.Uint32(b[recFixed+bs:]) {
		return record{}, false
	}
	return record{
		seq:     binary.LittleEndian.Uint64(b[8:]),
		area:    binary.LittleEndian.Uint64(b[16:]),
		s:       binary.LittleEndian.Uint32(b[24:]),
		a:       binary.LittleEndian.Uint32(b[28:]),
		w:       binary.LittleEndian.Uint32(b[32:]),
		sectors: binary.LittleEndian.Uint32(b[36:]),
		crc:     binary.LittleEndian.Uint32(b[44:]),
		pre:     b[recFixed : recFixed+bs],
	}, true
}

// repairFromRecord applies the recovery record of a store with chunk size
// cs to dev: if the area bytes the last change meant to write are not all
// there, it restores the block at S and zeros entries [A, W), then flushes.
// It reports whether it wrote anything, and the record's sequence number.
func repairFromRecord(dev blockdev.Device, cs int64) (repaired bool, seq uint64, err error) {
	rp, err := planRepair(dev, cs)
	if err != nil || !rp.needed {
		return false, rp.seq, err
	}
	if _, err := dev.WriteAt(rp.span, rp.at); err != nil {
		return false, 0, fmt.Errorf("exception: repair area %d: %w", rp.area, err)
	}
	if err := dev.Flush(); err != nil {
		return false, 0, fmt.Errorf("exception: repair area %d: flush: %w", rp.area, err)
	}
	return true, rp.seq, nil
}

// repair is what a recovery record asks of a device: when needed, span
// (the repaired area bytes) belongs at offset at.
type repair struct {
	seq    uint64 // the record's sequence; 0 when there is no usable record
	area   uint64
	needed bool
	at     int64
	span   []byte
}

// planRepair reads the recovery record and the area bytes it describes,
// without writing, and says whether Open would repair them.
func planRepair(dev blockdev.Device, cs int64) (repair, error) {
	bs := dev.BlockSize()
	off := recordOffset(dev.Size(), bs)
	if off < 0 {
		return repair{}, nil
	}
	buf := make([]byte, recordSize(bs))
	if _, err := dev.ReadAt(buf, off); err != nil {
		return repair{}, fmt.Errorf("exception: read recovery record: %w", err)
	}
	r, ok := decodeRecord(buf, bs)
	epa := uint64(cs / entrySize)
	bsEntries := uint32(bs / entrySize)
	if !ok || int64(r.sectors)*sectorSize != cs || r.s > r.a || r.a > r.w || uint64(r.w) > epa ||
		r.s%bsEntries != 0 || r.w%bsEntries != 0 || r.w == r.s {
		return repair{}, nil
	}
	loc := areaLocation(r.area, epa)
	if loc >= uint64(dev.Size()/cs) || int64(loc+1)*cs > off {
		return repair{}, nil
	}
	span := make([]byte, int64(r.w-r.s)*entrySize)
	at := int64(loc)*cs + int64(r.s)*entrySize
	if _, err := dev.ReadAt(span, at); err != nil {
		return repair{}, fmt.Errorf("exception: read area %d for recovery: %w", r.area, err)
	}
	rp := repair{seq: r.seq, area: r.area, at: at, span: span}
	if crc32.Checksum(span, castagnoli) == r.crc {
		return rp, nil
	}
	fixed := bytes.Clone(span)
	copy(fixed[:bs], r.pre)
	clear(fixed[int64(r.a-r.s)*entrySize:])
	// Already repaired (by an Open that crashed or closed before clearing
	// the record): nothing to do.
	rp.needed = !bytes.Equal(fixed, span)
	rp.span = fixed
	return rp, nil
}
