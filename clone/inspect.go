package clone

import (
	"errors"
	"fmt"

	"github.com/bits-and-blooms/bitset"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/journal"
)

// Info is what a clone's metadata device alone says about it: the geometry
// recorded at Create and how far hydration got, as the last commit left it.
type Info struct {
	// Problems lists what is wrong with the metadata, one line each;
	// empty when it is consistent. When the superblock cannot be read as
	// one, nothing else is known.
	blockdev.CheckReport
	RegionSize, SourceSize, DestSize int64 // bytes
	SourceBlock, DestBlock           int   // bytes
	Regions, Hydrated                uint64
	// Unclean: the clone ran with metadata sync off and was not closed
	// cleanly, so which regions are hydrated is not known (Open fails with
	// ErrUnclean); Hydrated is then what the last commit recorded.
	Unclean bool
}

// Inspect reads a clone's metadata device without writing to it and
// without the source or the destination (which may be remote, slow or
// gone), as thin_check and thin_dump do for thin pools: the superblock,
// then the journal replayed read-only. The error is for a device that
// cannot be read; damaged metadata is listed in Info.Problems.
func Inspect(meta blockdev.Device) (Info, error) {
	var info Info
	if meta.Size() < superArea {
		info.Addf("metadata device of %d bytes holds no superblock", meta.Size())
		return info, nil
	}
	sb := blockdev.AlignedBuffer(superArea)
	if _, err := meta.ReadAt(sb, 0); err != nil {
		return info, fmt.Errorf("clone: inspect: read superblock: %w", err)
	}
	g, err := decodeSuperblock(sb, meta.Size())
	if err != nil {
		info.Addf("superblock: %v", err)
		return info, nil
	}
	info.RegionSize, info.SourceSize, info.DestSize = g.RegionSize, g.SourceSize, g.DestSize
	info.SourceBlock, info.DestBlock, info.Regions = int(g.SourceBlock), int(g.DestBlock), g.Regions
	jd, err := blockdev.Slice(meta, g.JournalOffset, g.JournalLength)
	if err != nil {
		info.Addf("journal region: %v", err)
		return info, nil
	}
	rp := &replayer{regions: g.Regions, bm: bitset.New(uint(g.Regions))}
	j, err := journal.OpenReadOnly(jd, journal.Options{CheckpointSize: g.CheckpointSize}, rp)
	switch {
	case errors.Is(err, journal.ErrCorrupt) || errors.Is(err, ErrCorrupt):
		info.Addf("journal: %v", err)
		return info, nil
	case err != nil:
		return info, fmt.Errorf("clone: inspect: %w", err)
	}
	_ = j.Close() // read-only: nothing to lose
	if i, ok := rp.bm.NextSet(uint(g.Regions)); ok {
		info.Addf("hydrated bit %d set beyond %d regions", i, g.Regions)
	}
	info.Hydrated = uint64(rp.bm.Count())
	info.Unclean = rp.unsynced
	return info, nil
}
