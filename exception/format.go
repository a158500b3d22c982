package exception

// The persistent exception store: the Linux kernel's dm-snapshot on-disk
// format (drivers/md/dm-snap-persistent.c, disk version 1), so a COW device
// written by Linux opens here and one written here opens in Linux. All
// integers are little-endian. A chunk is ChunkSize bytes; chunk n starts at
// byte n*ChunkSize of the COW device.
//
// Header, chunk 0 (magic 0x70416e53, the bytes "SnAp"):
//
//	offset size meaning
//	0      4    magic 0x70416e53
//	4      4    valid: non-zero while the snapshot is usable; 0 once invalidated
//	8      4    version: 1
//	12     4    chunk size in 512-byte sectors (a power of two)
//	16     -    zero to the end of the chunk
//
// Metadata area i, chunk 1 + i*(epa+1), where epa = ChunkSize/16 is the
// number of exceptions per area:
//
//	offset  size meaning
//	16*j    8    old_chunk: the origin chunk of exception j
//	16*j+8  8    new_chunk: the COW chunk holding the origin's data as it
//	             was when the snapshot was taken
//
// The first entry whose new_chunk is 0 (which would be the header) ends the
// list. An area holding epa entries is full and area i+1 follows it; before
// area i can fill, area i+1 is zeroed on disk. The data chunks that follow
// area i on disk are 1+i*(epa+1)+1 ... (i+1)*(epa+1); data chunks are
// allocated upwards, skipping area locations.
//
// Kernel behaviours reproduced: the header and area layout above; a zero
// magic means "no snapshot here" (the kernel formats such a device, we
// format it in CreateSnapshot and refuse it in OpenSnapshot); any non-zero
// valid word is valid, and the areas of an invalid snapshot are not read;
// next_free after loading is one past the highest new_chunk, moved past an
// area location (skip_metadata); a metadata area is written whole blocks at
// a time after the data it describes is flushed and is itself flushed
// before the origin write proceeds (REQ_PREFLUSH|REQ_FUA); the next area is
// zeroed before the current one fills; invalidation rewrites the header
// with valid 0; merging removes exceptions from the end of the list
// backwards, clearing them in the last area only after the origin copy is
// durable; a trailing partial chunk of the COW device is never used.
//
// Not reproduced, on purpose: the kernel commits exceptions in completion
// order, so a crash can leave allocated chunks that no exception points at
// (holes it never reuses); we commit in allocation order, so the entries of
// an image we write are dense and a crash leaks nothing. The kernel has no
// defence against a torn metadata write; we keep a recovery record (see
// record.go) in the last blocks of the COW device, beyond the data chunks
// we allocate, that lets Open undo or finish a torn area write. The kernel
// ignores those blocks; where a kernel-written image already has data
// there, the record is not used for that device. The kernel keeps the
// "overflow" state of a PO snapshot in memory only; so do we. The kernel
// accepts duplicate old_chunk entries; we load them (the later wins) and
// Check reports them.

import (
	"encoding/binary"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	snapMagic   = 0x70416e53 // "SnAp" as a little-endian uint32
	diskVersion = 1
	sectorSize  = 512
	entrySize   = 16
	headerLen   = 16

	// DefaultChunkSize is the chunk size when Options.ChunkSize is zero:
	// 16 KiB, the kernel's default for persistent snapshots.
	DefaultChunkSize = 16 << 10
	// MaxChunkSize is the largest chunk size accepted.
	MaxChunkSize = 1 << 30

	// readPiece bounds the buffer the loader reads areas with, so a store
	// with 1 GiB chunks does not need a 1 GiB buffer to open.
	readPiece = 64 << 10
)

// Exception maps an origin chunk (Old) to the COW chunk (New) that holds
// the snapshot's copy of it.
type Exception struct {
	Old, New uint64
}

// Image is a persistent store as LoadPersistent decodes it.
type Image struct {
	Valid     bool
	Version   uint32
	ChunkSize int64 // bytes
	// Entries are the exceptions in on-disk order: area by area, entry by
	// entry, up to the first new_chunk 0.
	Entries []Exception
	// NextFree is the kernel's next_free: the first chunk a new exception
	// would be allocated at.
	NextFree uint64
}

// checkChunkSize validates a chunk size in bytes against the smallest
// block size that must divide it.
func checkChunkSize(cs int64, minBlock int) error {
	if cs <= 0 || cs&(cs-1) != 0 {
		return fmt.Errorf("%w: %d is not a power of two", ErrChunkSize, cs)
	}
	if cs < int64(minBlock) || cs < sectorSize {
		return fmt.Errorf("%w: %d is smaller than the block size %d", ErrChunkSize, cs, max(minBlock, sectorSize))
	}
	if cs > MaxChunkSize {
		return fmt.Errorf("%w: %d is larger than %d", ErrChunkSize, cs, MaxChunkSize)
	}
	return nil
}

// areaLocation is the chunk holding metadata area a.
func areaLocation(a, epa uint64) uint64 { return 1 + a*(epa+1) }

// isAreaChunk reports whether chunk x holds a metadata area (or the header).
func isAreaChunk(x, epa uint64) bool { return x == 0 || x%(epa+1) == 1 }

// skipMeta moves a free-chunk cursor off an area location, as the kernel's
// skip_metadata does.
func skipMeta(x, epa uint64) uint64 {
	if x%(epa+1) == 1 {
		x++
	}
	return x
}

func encodeHeader(dst []byte, valid bool, chunkSize int64) {
	clear(dst)
	binary.LittleEndian.PutUint32(dst[0:], snapMagic)
	v := uint32(0)
	if valid {
		v = 1
	}
	binary.LittleEndian.PutUint32(dst[4:], v)
	binary.LittleEndian.PutUint32(dst[8:], diskVersion)
	binary.LittleEndian.PutUint32(dst[12:], uint32(chunkSize/sectorSize))
}

// decodeHeader checks the header in b (at least 16 bytes) against a device
// of the given size and block size.
func decodeHeader(b []byte, devSize int64, bs int) (valid bool, chunkSize int64, err error) {
	magic := binary.LittleEndian.Uint32(b[0:])
	if magic == 0 {
		return false, 0, fmt.Errorf("%w: chunk 0 holds no header (magic 0): not a persistent store", ErrBadHeader)
	}
	if magic != snapMagic {
		return false, 0, fmt.Errorf("%w: %#08x, want %#08x", ErrBadMagic, magic, snapMagic)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != diskVersion {
		return false, 0, fmt.Errorf("%w: disk version %d, want %d", ErrBadHeader, v, diskVersion)
	}
	cs := int64(binary.LittleEndian.Uint32(b[12:])) * sectorSize
	if err := checkChunkSize(cs, bs); err != nil {
		return false, 0, fmt.Errorf("header: %w", err)
	}
	if 2*cs > devSize {
		return false, 0, fmt.Errorf("%w: chunk size %d leaves no room for a metadata area on a %d-byte device", ErrBadHeader, cs, devSize)
	}
	return binary.LittleEndian.Uint32(b[4:]) != 0, cs, nil
}

// putEntries encodes into dst the area bytes [from*16, from*16+len(dst)) of
// area a, given the store's entries in on-disk order: entries past the end
// of the list are zero.
func putEntries(dst []byte, entries []Exception, a, epa, from uint64) {
	clear(dst)
	base := a*epa + from
	for i := 0; i+entrySize <= len(dst); i += entrySize {
		k := base + uint64(i/entrySize)
		if k >= uint64(len(entries)) {
			break
		}
		binary.LittleEndian.PutUint64(dst[i:], entries[k].Old)
		binary.LittleEndian.PutUint64(dst[i+8:], entries[k].New)
	}
}

// LoadPersistent decodes the persistent store on dev without writing to
// it. It returns ErrBadHeader, ErrBadMagic or ErrChunkSize for a header it
// cannot use and ErrCorrupt, wrapped with the location, for inconsistent
// areas. It never allocates more than a small multiple of what the device
// holds.
func LoadPersistent(dev blockdev.Device) (*Image, error) {
	bs, size := dev.BlockSize(), dev.Size()
	if size < int64(bs) || bs < headerLen {
		return nil, fmt.Errorf("%w: device of %d bytes", ErrBadHeader, size)
	}
	hdr := make([]byte, bs)
	if _, err := dev.ReadAt(hdr, 0); err != nil {
		return nil, fmt.Errorf("exception: read header: %w", err)
	}
	valid, cs, err := decodeHeader(hdr, size, bs)
	if err != nil {
		return nil, err
	}
	img := &Image{Valid: valid, Version: diskVersion, ChunkSize: cs}
	if !valid {
		return img, nil
	}
	if err := loadAreas(dev, img); err != nil {
		return nil, err
	}
	return img, nil
}

// loadAreas reads metadata areas until one that is not full.
func loadAreas(dev blockdev.Device, img *Image) error {
	cs := img.ChunkSize
	devChunks := uint64(dev.Size() / cs)
	epa := uint64(cs / entrySize)
	used := make([]uint64, (devChunks+63)/64) // one bit per COW chunk
	buf := make([]byte, min(cs, readPiece))
	nextFree := uint64(2) // the header and the first area
	for a := uint64(0); ; a++ {
		loc := areaLocation(a, epa)
		if loc >= devChunks {
			break // the last area was full and no room is left for another
		}
		full, err := loadArea(dev, img, buf, a, loc, epa, devChunks, used, &nextFree)
		if err != nil {
			return err
		}
		if !full {
			break
		}
	}
	img.NextFree = skipMeta(nextFree, epa)
	return nil
}

func loadArea(dev blockdev.Device, img *Image, buf []byte, a, loc, epa, devChunks uint64, used []uint64, nextFree *uint64) (bool, error) {
	cs := img.ChunkSize
	for off := int64(0); off < cs; off += int64(len(buf)) {
		if _, err := dev.ReadAt(buf, int64(loc)*cs+off); err != nil {
			return false, fmt.Errorf("exception: read metadata area %d: %w", a, err)
		}
		for i := 0; i < len(buf); i += entrySize {
			e := Exception{Old: binary.LittleEndian.Uint64(buf[i:]), New: binary.LittleEndian.Uint64(buf[i+8:])}
			if e.New == 0 {
				return false, nil
			}
			j := uint64(off+int64(i)) / entrySize
			where := func() string { return fmt.Sprintf("area %d (chunk %d) entry %d", a, loc, j) }
			switch {
			case e.New >= devChunks:
				return false, fmt.Errorf("%w: %s: new chunk %d beyond the device's %d chunks", ErrCorrupt, where(), e.New, devChunks)
			case isAreaChunk(e.New, epa):
				return false, fmt.Errorf("%w: %s: new chunk %d is a metadata chunk", ErrCorrupt, where(), e.New)
			case used[e.New/64]&(1<<(e.New%64)) != 0:
				return false, fmt.Errorf("%w: %s: new chunk %d used twice", ErrCorrupt, where(), e.New)
			}
			used[e.New/64] |= 1 << (e.New % 64)
			img.Entries = append(img.Entries, e)
			*nextFree = max(*nextFree, e.New+1)
		}
	}
	return true, nil
}
