package nbd

import "github.com/blocksnap/blocksnap/blockdev"

// Requests of any alignment. The server advertises a minimum block size of
// 1, as nbdkit and qemu-nbd do, because real clients (the Linux loop
// device with its 512-byte sectors, libnbd in its default strict mode)
// send requests smaller than a 4 KiB device block. A Device takes only
// whole blocks, so a request is split into a partial head block, whole
// blocks in the middle and a partial tail block. Reads of a partial block
// read the whole block into a scratch buffer. Writes and zeroing of a
// partial block are a read-modify-write of that block under the export's
// range lock, held exclusively; the whole-block middle is written under
// the same lock held shared. So two clients writing different sectors of
// one block both survive, and a whole-block write is never lost to a
// read-modify-write that read the block before it.

// span splits [off, off+n) into the bytes before the first block boundary
// (head, 0 if off is aligned and n reaches it), whole blocks (mid) and the
// bytes after the last boundary (tail). When the range lies inside one
// block and does not cover it, all of it is head.
func span(off, n, bs int64) (head, mid, tail int64) {
	if r := off % bs; r != 0 {
		head = min(bs-r, n)
	} else if n < bs {
		head = n
	}
	n -= head
	tail = n % bs
	return head, n - tail, tail
}

// readAt reads len(p) bytes at off, any alignment.
func (c *conn) readAt(p []byte, off int64) error {
	dev, bs := c.exp.Device, c.bs
	head, mid, tail := span(off, int64(len(p)), bs)
	if head == 0 && tail == 0 {
		_, err := dev.ReadAt(p, off)
		return err
	}
	sp := getBuf(int(bs))
	defer putBuf(sp)
	s := (*sp)[:bs]
	if head > 0 {
		start := off - off%bs
		if _, err := dev.ReadAt(s, start); err != nil {
			return err
		}
		copy(p[:head], s[off-start:])
	}
	if mid > 0 {
		if _, err := dev.ReadAt(p[head:head+mid], off+head); err != nil {
			return err
		}
	}
	if tail > 0 {
		if _, err := dev.ReadAt(s, off+head+mid); err != nil {
			return err
		}
		copy(p[head+mid:], s[:tail])
	}
	return nil
}

// writeAt writes p at off, any alignment; fua makes each part durable
// before it returns.
func (c *conn) writeAt(p []byte, off int64, fua bool) error {
	head, mid, tail := span(off, int64(len(p)), c.bs)
	if head > 0 {
		if err := c.modify(off, p[:head], head, fua); err != nil {
			return err
		}
	}
	if mid > 0 {
		at := off + head
		id := c.exp.locks.lock(at, at+mid, false)
		var err error
		if fua {
			_, err = blockdev.WriteFUA(c.exp.Device, p[head:head+mid], at)
		} else {
			_, err = c.exp.Device.WriteAt(p[head:head+mid], at)
		}
		c.exp.locks.unlock(id)
		if err != nil {
			return err
		}
	}
	if tail > 0 {
		return c.modify(off+head+mid, p[head+mid:], tail, fua)
	}
	return nil
}

// zeroRange makes [off, off+n) read as zeros, any alignment. Whole blocks
// are discarded, or written as zeros when noHole is set (ZeroWriter where
// the device has it); the bytes of partial blocks are written as zeros by
// read-modify-write.
func (c *conn) zeroRange(off, n int64, noHole, fua bool) error {
	head, mid, tail := span(off, n, c.bs)
	if head > 0 {
		if err := c.modify(off, nil, head, fua); err != nil {
			return err
		}
	}
	if mid > 0 {
		at := off + head
		dev := c.exp.Device
		id := c.exp.locks.lock(at, at+mid, false)
		var err error
		if noHole {
			err = blockdev.WriteZeroes(dev, at, mid)
		} else {
			err = dev.Discard(at, mid)
		}
		c.exp.locks.unlock(id)
		if err == nil && fua {
			err = dev.Flush()
		}
		if err != nil {
			return err
		}
	}
	if tail > 0 {
		return c.modify(off+head+mid, nil, tail, fua)
	}
	return nil
}

// modify is the read-modify-write of the n bytes at off, which lie inside
// one block: they become data, or zeros when data is nil.
func (c *conn) modify(off int64, data []byte, n int64, fua bool) error {
	dev, bs := c.exp.Device, c.bs
	start := off - off%bs
	sp := getBuf(int(bs))
	defer putBuf(sp)
	s := (*sp)[:bs]
	id := c.exp.locks.lock(start, start+bs, true)
	defer c.exp.locks.unlock(id)
	if _, err := dev.ReadAt(s, start); err != nil {
		return err
	}
	if data == nil {
		clear(s[off-start : off-start+n])
	} else {
		copy(s[off-start:], data[:n])
	}
	var err error
	if fua {
		_, err = blockdev.WriteFUA(dev, s, start)
	} else {
		_, err = dev.WriteAt(s, start)
	}
	return err
}
