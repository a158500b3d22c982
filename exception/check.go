package exception

import (
	"encoding/binary"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// COWReport is what CheckCOW found on a persistent COW device.
type COWReport struct {
	// Problems lists every inconsistency, one line each; empty when the
	// device is consistent.
	blockdev.CheckReport
	Valid      bool  // the header says the snapshot is usable
	ChunkSize  int64 // bytes
	Exceptions uint64
	// DataChunks counts the chunks below the allocation cursor that are
	// not header or metadata; Leaked those no exception points at (a
	// kernel-written store can leak after a crash: it commits out of
	// order).
	DataChunks, Leaked uint64
	// NextFree is the kernel's next_free after loading.
	NextFree uint64
	// PendingRepair is set when the recovery record describes a torn
	// metadata write that OpenSnapshot would repair (area RepairArea).
	PendingRepair bool
	RepairArea    uint64
}

// CheckCOW inspects a persistent COW device (written by this package or by
// the Linux kernel) without writing to it and without its origin, as
// thin_check does for thin pools: the header, every metadata area up to
// the end of the list, and the recovery record. Where LoadPersistent stops
// at the first bad entry, CheckCOW reports every one: COW chunks beyond the
// device, on metadata, or used twice, and origin chunks with two exceptions
// (the kernel loads those, the later wins). originSize, when positive, is
// the origin's size in bytes, and origin chunks beyond it are reported too.
// The error is for a device that cannot be read; a header that is not a
// store's is a problem in the report.
func CheckCOW(cow blockdev.Device, originSize int64) (COWReport, error) {
	var rep COWReport
	bs, size := cow.BlockSize(), cow.Size()
	if size < int64(bs) || bs < headerLen {
		rep.Addf("device of %d bytes holds no header", size)
		return rep, nil
	}
	hdr := make([]byte, bs)
	if _, err := cow.ReadAt(hdr, 0); err != nil {
		return rep, fmt.Errorf("exception: check: read header: %w", err)
	}
	valid, cs, err := decodeHeader(hdr, size, bs)
	if err != nil {
		rep.Addf("header: %v", err)
		return rep, nil
	}
	rep.Valid, rep.ChunkSize = valid, cs
	if !valid {
		return rep, nil // the areas of an invalid snapshot are not read
	}
	if err := checkAreas(cow, cs, originSize, &rep); err != nil {
		return rep, err
	}
	rp, err := planRepair(cow, cs)
	if err != nil {
		return rep, fmt.Errorf("exception: check: %w", err)
	}
	rep.PendingRepair, rep.RepairArea = rp.needed, rp.area
	if rp.needed {
		rep.Addf("metadata area %d: a torn write that the recovery record describes (opening the snapshot read-write repairs it)", rp.area)
	}
	return rep, nil
}

// checkAreas walks the metadata areas as loadAreas does, reporting every
// bad entry instead of stopping at the first.
func checkAreas(cow blockdev.Device, cs, originSize int64, rep *COWReport) error {
	devChunks := uint64(cow.Size() / cs)
	epa := uint64(cs / entrySize)
	var originChunks uint64
	if originSize > 0 {
		originChunks = uint64((originSize + cs - 1) / cs)
	}
	used := make([]uint64, (devChunks+63)/64)
	olds := map[uint64]uint64{} // origin chunk -> index of its first exception
	buf := make([]byte, min(cs, readPiece))
	nextFree := uint64(2)
	var k uint64 // exception index in on-disk order
	for a := uint64(0); ; a++ {
		loc := areaLocation(a, epa)
		if loc >= devChunks {
			break
		}
		full := true
		for off := int64(0); off < cs && full; off += int64(len(buf)) {
			if _, err := cow.ReadAt(buf, int64(loc)*cs+off); err != nil {
				return fmt.Errorf("exception: check: read metadata area %d: %w", a, err)
			}
			for i := 0; i < len(buf); i += entrySize {
				e := Exception{Old: binary.LittleEndian.Uint64(buf[i:]), New: binary.LittleEndian.Uint64(buf[i+8:])}
				if e.New == 0 {
					full = false
					break
				}
				where := fmt.Sprintf("area %d (chunk %d) entry %d", a, loc, uint64(off+int64(i))/entrySize)
				checkEntry(rep, e, k, where, devChunks, epa, originChunks, used, olds)
				if e.New < devChunks {
					nextFree = max(nextFree, e.New+1)
				}
				k++
			}
		}
		if !full {
			break
		}
	}
	rep.Exceptions = k
	rep.NextFree = skipMeta(nextFree, epa)
	for x := uint64(2); x < rep.NextFree && x < devChunks; x++ {
		if isAreaChunk(x, epa) {
			continue
		}
		rep.DataChunks++
		if used[x/64]&(1<<(x%64)) == 0 {
			rep.Leaked++
		}
	}
	return nil
}

func checkEntry(rep *COWReport, e Exception, k uint64, where string, devChunks, epa, originChunks uint64, used []uint64, olds map[uint64]uint64) {
	switch {
	case e.New >= devChunks:
		rep.Addf("%s: COW chunk %d beyond the device's %d chunks", where, e.New, devChunks)
	case isAreaChunk(e.New, epa):
		rep.Addf("%s: COW chunk %d is a metadata chunk", where, e.New)
	case used[e.New/64]&(1<<(e.New%64)) != 0:
		rep.Addf("%s: COW chunk %d used twice", where, e.New)
	default:
		used[e.New/64] |= 1 << (e.New % 64)
	}
	if originChunks > 0 && e.Old >= originChunks {
		rep.Addf("%s: origin chunk %d beyond the origin's %d chunks", where, e.Old, originChunks)
	}
	if first, dup := olds[e.Old]; dup {
		rep.Addf("%s: origin chunk %d has a second exception (the first is exception %d; the later wins)", where, e.Old, first)
	} else {
		olds[e.Old] = k
	}
}
