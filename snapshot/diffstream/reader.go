package diffstream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/klauspost/compress/zstd"
)

// Record is one decoded DATA or ZERO record.
type Record struct {
	// Index is the record's position in the stream (0 is the first record
	// after the header); unknown records count too.
	Index int64
	// Pos is the byte offset of the record in the stream.
	Pos  int64
	Type uint8 // TypeData or TypeZero
	Off  int64 // volume offset
	Len  int64 // bytes covered
	// Data holds the bytes of a DATA record. It is valid until the next
	// call to Next.
	Data []byte
}

// Reader decodes a stream, verifying every record's checksum, the totals
// and the stream checksum in END. It never panics on bad input, and its
// allocations are bounded by the bytes the stream actually delivers (at
// most MaxPayload plus a small constant). Damage is reported as a
// *CorruptError (errors.Is(err, ErrCorrupt)) with the byte offset; errors
// of the underlying reader are returned as they are. For a compressed
// stream (version 2, FlagZstd) offsets count decompressed bytes, and damage
// the decompressor finds is corrupt too; the decompressor's memory is
// bounded by the window the format allows. Close releases it.
type Reader struct {
	r       io.Reader // the records: the stream itself, or zr over it
	raw     *errTap   // the caller's reader, noting its errors
	zr      *zstd.Decoder
	h       Header
	pos     int64  // bytes consumed
	crc     uint32 // CRC32C of every byte consumed
	k       int64  // index of the next record
	totals  Totals
	skipped int64
	done    bool
	err     error // sticky
	buf     []byte
	rh      [recordHeader]byte
}

// errTap passes reads through and remembers the last error other than
// io.EOF, so that an error coming out of the decompressor can be told apart:
// the caller's reader failing, or damaged compressed data.
type errTap struct {
	r   io.Reader
	err error
}

func (t *errTap) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF {
		t.err = err
	}
	return n, err
}

// maxZstdWindow bounds the window a compressed stream may ask the reader
// to allocate: twice what this package's writer uses.
const maxZstdWindow = 2 * zstdWindow

// NewReader reads and verifies the stream's header. A stream of a version
// this package does not know is refused with ErrVersion, naming both.
func NewReader(r io.Reader) (*Reader, error) {
	tap := &errTap{r: r}
	sr := &Reader{r: tap, raw: tap}
	var fixed [12]byte
	if err := sr.read(fixed[:], -1); err != nil {
		return nil, err
	}
	if string(fixed[:8]) != Magic {
		return nil, &CorruptError{Offset: 0, Record: -1, Reason: "bad magic: not a blocksnap diff stream"}
	}
	n := int(binary.LittleEndian.Uint16(fixed[10:]))
	if n < minHeader || n > MaxHeader {
		return nil, &CorruptError{Offset: 10, Record: -1, Reason: fmt.Sprintf("header length %d outside [%d, %d]", n, minHeader, MaxHeader)}
	}
	b := make([]byte, n)
	copy(b, fixed[:])
	if err := sr.read(b[12:], -1); err != nil {
		return nil, err
	}
	if v := binary.LittleEndian.Uint16(fixed[8:]); v != Version1 && v != Version2 {
		// Checked after reading the header so that a damaged version
		// field of a valid stream reads as damage, not as a new version.
		if crc32.Checksum(b[:n-4], castagnoli) == binary.LittleEndian.Uint32(b[n-4:]) {
			return nil, fmt.Errorf("%w: stream version %d, this reader knows versions %d and %d", ErrVersion, v, Version1, Version2)
		}
	}
	h, err := decodeHeader(b)
	if err != nil {
		return nil, err
	}
	sr.h = h
	sr.crc = crc32.Checksum(b, castagnoli)
	if h.Compressed() {
		zr, err := zstd.NewReader(tap, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow),
			zstd.WithDecoderMaxMemory(MaxPayload+maxZstdWindow))
		if err != nil {
			return nil, fmt.Errorf("diffstream: decompressor: %w", err)
		}
		sr.zr, sr.r = zr, zr
	}
	return sr, nil
}

// Close releases the decompressor of a compressed stream; reads after it
// fail. It does not close the underlying reader.
func (r *Reader) Close() error {
	if r.zr != nil {
		r.zr.Close()
	}
	if r.err == nil {
		r.err = errors.New("diffstream: reader closed")
	}
	return nil
}

// Header returns the stream's header.
func (r *Reader) Header() Header { return r.h }

// Totals returns the totals of the records read so far; after Next has
// returned io.EOF, the stream's verified totals.
func (r *Reader) Totals() Totals { return r.totals }

// Skipped is the number of records of unknown types skipped so far.
func (r *Reader) Skipped() int64 { return r.skipped }

// Pos is the number of stream bytes consumed so far.
func (r *Reader) Pos() int64 { return r.pos }

// read fills p from the stream. A stream that ends early is corrupt
// (truncated); other read errors pass through.
func (r *Reader) read(p []byte, rec int64) error {
	n, err := io.ReadFull(r.r, p)
	r.pos += int64(n)
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &CorruptError{Offset: r.pos, Record: rec, Reason: "stream truncated"}
	}
	if r.zr != nil {
		if r.raw.err == nil {
			return &CorruptError{Offset: r.pos, Record: rec, Reason: fmt.Sprintf("compressed data: %v", err)}
		}
		err = r.raw.err // the decompressor may not wrap it
	}
	return fmt.Errorf("diffstream: read at byte %d: %w", r.pos, err)
}

// payload reads n bytes into r.buf, growing it only as bytes arrive, so a
// lying length field cannot make the reader allocate more than about twice
// what the stream really holds.
func (r *Reader) payload(n int, rec int64) ([]byte, error) {
	const step = 64 << 10
	if cap(r.buf) >= n {
		r.buf = r.buf[:n]
		return r.buf, r.read(r.buf, rec)
	}
	have := 0
	r.buf = r.buf[:0]
	for have < n {
		want := min(n, max(2*have, step))
		if cap(r.buf) < want {
			nb := make([]byte, want)
			copy(nb, r.buf[:have])
			r.buf = nb
		}
		r.buf = r.buf[:want]
		if err := r.read(r.buf[have:want], rec); err != nil {
			return nil, err
		}
		have = want
	}
	return r.buf, nil
}

// Next returns the next DATA or ZERO record, skipping (after verifying)
// records of unknown types. After a verified END it returns io.EOF. The
// first error is sticky.
func (r *Reader) Next() (Record, error) {
	if r.err != nil {
		return Record{}, r.err
	}
	for {
		rec, known, err := r.next()
		if err != nil {
			r.err = err
			return Record{}, err
		}
		if known {
			return rec, nil
		}
	}
}

func (r *Reader) next() (Record, bool, error) {
	if r.done {
		return Record{}, false, io.EOF
	}
	start, k := r.pos, r.k
	bad := func(format string, args ...any) (Record, bool, error) {
		return Record{}, false, &CorruptError{Offset: start, Record: k, Reason: fmt.Sprintf(format, args...)}
	}
	if err := r.read(r.rh[:], k); err != nil {
		return Record{}, false, err
	}
	typ := r.rh[0]
	n := binary.LittleEndian.Uint32(r.rh[4:])
	if n > MaxPayload {
		return bad("payload length %d exceeds %d", n, MaxPayload)
	}
	p, err := r.payload(int(n), k)
	if err != nil {
		return Record{}, false, err
	}
	var tr [recordTrailer]byte
	if err := r.read(tr[:], k); err != nil {
		return Record{}, false, err
	}
	if got, want := recordCRC(k, r.rh[:], p), binary.LittleEndian.Uint32(tr[:]); got != want {
		return bad("checksum %#08x, want %#08x", got, want)
	}
	if r.rh[1] != 0 || r.rh[2] != 0 || r.rh[3] != 0 {
		return bad("reserved record header bytes are not zero")
	}
	streamCRC := r.crc
	r.crc = crc32.Update(r.crc, castagnoli, r.rh[:])
	r.crc = crc32.Update(r.crc, castagnoli, p)
	r.crc = crc32.Update(r.crc, castagnoli, tr[:])
	r.k++
	rec := Record{Index: k, Pos: start, Type: typ}
	switch typ {
	case TypeData:
		if len(p) <= 8 || len(p)-8 > MaxData {
			return bad("DATA payload of %d bytes", len(p))
		}
		rec.Off, rec.Len, rec.Data = int64(binary.LittleEndian.Uint64(p)), int64(len(p)-8), p[8:]
	case TypeZero:
		if len(p) != 16 {
			return bad("ZERO payload of %d bytes, want 16", len(p))
		}
		rec.Off, rec.Len = int64(binary.LittleEndian.Uint64(p)), int64(binary.LittleEndian.Uint64(p[8:]))
	case TypeEnd:
		return r.end(p, streamCRC, bad)
	default:
		r.totals.Records++
		r.skipped++
		return Record{}, false, nil
	}
	bs, size := int64(r.h.BlockSize), r.h.VolumeSize
	if rec.Off < 0 || rec.Len <= 0 || rec.Off%bs != 0 || rec.Len%bs != 0 || rec.Off > size || rec.Len > size-rec.Off {
		return bad("extent [%d, +%d) is not block-aligned within the volume of %d bytes", rec.Off, rec.Len, size)
	}
	r.totals.Records++
	if typ == TypeData {
		r.totals.DataBytes += rec.Len
	} else {
		r.totals.ZeroBytes += rec.Len
	}
	return rec, true, nil
}

// end verifies the END record against what was read.
func (r *Reader) end(p []byte, streamCRC uint32, bad func(string, ...any) (Record, bool, error)) (Record, bool, error) {
	if len(p) != endPayload {
		return bad("END payload of %d bytes, want %d", len(p), endPayload)
	}
	want := Totals{
		Records:   int64(binary.LittleEndian.Uint64(p[0:])),
		DataBytes: int64(binary.LittleEndian.Uint64(p[8:])),
		ZeroBytes: int64(binary.LittleEndian.Uint64(p[16:])),
	}
	if want != r.totals {
		return bad("END totals %+v differ from the stream's %+v", want, r.totals)
	}
	if got := binary.LittleEndian.Uint32(p[24:]); got != streamCRC {
		return bad("stream checksum %#08x, want %#08x", got, streamCRC)
	}
	r.done = true
	return Record{}, false, io.EOF
}
