package blockdev

import (
	"errors"
	"fmt"
	"io"
)

// writerBuffer is the most bytes a Writer holds before writing them out.
const writerBuffer = 1 << 20

// Writer adapts a Device to io.Writer (and io.WriterAt, io.ReaderFrom) for
// byte streams that know nothing of blocks, so that io.Copy from a network
// connection or a decompressor into a device works. Write buffers bytes and
// writes whole blocks; a block only partly covered by the stream (at the
// start offset, or where the stream ends) is read, patched and written back
// (read-modify-write), so bytes outside what was written keep their old
// contents. Nothing is promised durable until Close (or Flush then the
// device's Flush).
//
// A Writer is not safe for concurrent use, and the read-modify-write of a
// partial block races with other writers of the same block: one goroutine
// owns the range it writes through a Writer.
type Writer struct {
	dev    Device
	bs     int64
	pos    int64  // device offset of the next byte Write takes
	buf    []byte // aligned; buf[:n] belongs at device offset base
	blk    []byte // one aligned block, for the read-modify-write of a tail
	base   int64  // block-aligned
	n      int64
	err    error // sticky: the first device error
	closed bool
}

// NewWriter returns a Writer whose first Write lands at device offset off
// (any byte offset within the device).
func NewWriter(dev Device, off int64) *Writer {
	w := &Writer{dev: dev, bs: int64(dev.BlockSize()), pos: off}
	if off < 0 || off > dev.Size() {
		w.err = fmt.Errorf("%w: writer at %d on a device of %d bytes", ErrOutOfRange, off, dev.Size())
	}
	return w
}

// Offset returns the device offset the next Write writes at.
func (w *Writer) Offset() int64 { return w.pos }

func (w *Writer) usable() error {
	if w.closed {
		return fmt.Errorf("blockdev: writer: %w", ErrClosed)
	}
	return w.err
}

// Write implements io.Writer. Bytes that would pass the end of the device
// are refused with ErrOutOfRange (none of p is taken then).
func (w *Writer) Write(p []byte) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	if int64(len(p)) > w.dev.Size()-w.pos {
		return 0, fmt.Errorf("%w: write of %d bytes at %d on a device of %d bytes", ErrOutOfRange, len(p), w.pos, w.dev.Size())
	}
	done := 0
	for done < len(p) {
		room, err := w.room()
		if err != nil {
			return done, err
		}
		k := copy(room, p[done:])
		w.n += int64(k)
		w.pos += int64(k)
		done += k
	}
	return done, nil
}

// ReadFrom implements io.ReaderFrom: it reads r into the aligned buffer
// directly (io.Copy uses it), until io.EOF or the end of the device. Bytes
// past the end of the device make it fail with ErrOutOfRange.
func (w *Writer) ReadFrom(r io.Reader) (int64, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	var total int64
	for {
		room, err := w.room()
		if err != nil {
			return total, err
		}
		room = room[:min(int64(len(room)), w.dev.Size()-w.pos)]
		if len(room) == 0 {
			// At the end of the device: anything more is out of range.
			var one [1]byte
			k, err := r.Read(one[:])
			if k > 0 {
				return total, fmt.Errorf("%w: stream continues past the end of the device (%d bytes)", ErrOutOfRange, w.dev.Size())
			}
			if errors.Is(err, io.EOF) {
				return total, nil
			}
			if err != nil {
				return total, err
			}
			continue
		}
		k, err := r.Read(room)
		w.n += int64(k)
		w.pos += int64(k)
		total += int64(k)
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// room returns the free part of the buffer, writing the buffer out first
// when it is full and starting a new one (with the head block read from the
// device when the position is not block aligned) when it is empty.
func (w *Writer) room() ([]byte, error) {
	if w.buf == nil {
		w.buf = AlignedBuffer(int(max(writerBuffer/w.bs*w.bs, w.bs)))
	}
	if w.n == int64(len(w.buf)) {
		if err := w.Flush(); err != nil {
			return nil, err
		}
	}
	if w.n == 0 {
		w.base = w.pos / w.bs * w.bs
		if head := w.pos - w.base; head > 0 {
			if _, err := w.dev.ReadAt(w.buf[:w.bs], w.base); err != nil {
				w.err = fmt.Errorf("blockdev: writer: read block at %d: %w", w.base, err)
				return nil, w.err
			}
			w.n = head
		}
	}
	return w.buf[w.n:], nil
}

// Flush writes the buffered bytes to the device (a partial last block by
// read-modify-write). It does not flush the device; Close does.
func (w *Writer) Flush() error {
	if err := w.usable(); err != nil {
		return err
	}
	if w.n == 0 {
		return nil
	}
	whole := w.n / w.bs * w.bs
	if tail := w.n - whole; tail > 0 {
		// Patch the last block: the device's bytes after the stream's.
		if w.blk == nil {
			w.blk = AlignedBuffer(int(w.bs))
		}
		blk := w.blk
		if _, err := w.dev.ReadAt(blk, w.base+whole); err != nil {
			w.err = fmt.Errorf("blockdev: writer: read block at %d: %w", w.base+whole, err)
			return w.err
		}
		copy(w.buf[whole+tail:whole+w.bs], blk[tail:])
		whole += w.bs
	}
	if _, err := w.dev.WriteAt(w.buf[:whole], w.base); err != nil {
		w.err = fmt.Errorf("blockdev: writer: write at %d: %w", w.base, err)
		return w.err
	}
	w.n = 0
	return nil
}

// WriteAt implements io.WriterAt: it writes p at device offset off (any
// alignment) through the same buffer, after writing out what Write had
// buffered. Write continues where it was.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	if err := w.Flush(); err != nil {
		return 0, err
	}
	if off < 0 || off > w.dev.Size() {
		return 0, fmt.Errorf("%w: write of %d bytes at %d on a device of %d bytes", ErrOutOfRange, len(p), off, w.dev.Size())
	}
	pos := w.pos
	w.pos = off
	k, err := w.Write(p)
	if err == nil {
		err = w.Flush()
	}
	w.pos = pos
	return k, err
}

// Close writes out what is buffered and flushes the device, so that every
// byte written through w is durable when it returns nil. It does not close
// the device.
func (w *Writer) Close() error {
	err := w.Flush()
	if err == nil {
		if err = w.dev.Flush(); err != nil {
			err = fmt.Errorf("blockdev: writer: flush: %w", err)
		}
	}
	w.closed = true
	return err
}
