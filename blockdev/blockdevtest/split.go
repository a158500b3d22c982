package blockdevtest

import "github.com/blocksnap/blocksnap/blockdev"

// Split is a device made of two: its first At bytes are Head's and the
// rest are Tail's. Scale runs use it to keep a store's metadata (its
// superblock, journal and metadata region) on a real device while its
// data region is a data-less Null: the index is real, the data is not.
//
// An I/O must not cross At (callers choose At on a boundary their I/O
// never crosses, such as the store's data offset, a multiple of its chunk
// size); one that does is refused with blockdev.ErrOutOfRange. Flush and
// Close go to Head only: Null needs neither.
type Split struct {
	Head, Tail blockdev.Device
	At         int64
}

func (d *Split) dev(off, n int64) (blockdev.Device, int64, error) {
	if off >= d.At {
		return d.Tail, off - d.At, nil
	}
	if off+n > d.At {
		return nil, 0, blockdev.ErrOutOfRange
	}
	return d.Head, off, nil
}

func (d *Split) ReadAt(p []byte, off int64) (int, error) {
	dev, o, err := d.dev(off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	return dev.ReadAt(p, o)
}

func (d *Split) WriteAt(p []byte, off int64) (int, error) {
	dev, o, err := d.dev(off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	return dev.WriteAt(p, o)
}

func (d *Split) Discard(off, n int64) error {
	dev, o, err := d.dev(off, n)
	if err != nil {
		return err
	}
	return dev.Discard(o, n)
}

func (d *Split) Flush() error   { return d.Head.Flush() }
func (d *Split) Size() int64    { return d.At + d.Tail.Size() }
func (d *Split) BlockSize() int { return max(d.Head.BlockSize(), d.Tail.BlockSize()) }
func (d *Split) Close() error   { return d.Head.Close() }
