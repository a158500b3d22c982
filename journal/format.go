package journal

// On-disk format. All integers are little-endian. bs is the device's logical
// block size; every structure starts on a block boundary.
//
// Journal region (the whole device handed to Format/Open):
//
//	offset        size  contents
//	0             bs    superblock copy 0
//	bs            bs    superblock copy 1 (same contents but location)
//	2*bs          S     checkpoint slot 0
//	2*bs+S        S     checkpoint slot 1
//	2*bs+2*S      L     circular record log (the rest of the device)
//
// Every superblock update writes copy 0, flushes, writes copy 1, flushes,
// both with the next generation; the valid copy with the highest generation
// is current. A torn write leaves the other copy in charge, holding either
// the same state or the previous one (never reclaimed before both copies
// are durable), and a copy damaged later is covered by its twin. A checkpoint slot holds a raw stream whose length and
// CRC32C are in the superblock that points to it.
//
// Superblock, magic "BSNAPJSB" (sbSize bytes, rest of the block unused):
//
//	off  size  field
//	0    8     magic "BSNAPJSB"
//	8    4     version (1)
//	12   4     block size in bytes
//	16   8     location: byte offset of this copy in the journal region
//	24   8     journal id (random at Format; every log batch carries it)
//	32   8     generation (incremented by every update; highest valid wins)
//	40   8     epoch (incremented by every Open; log batches carry it)
//	48   8     region size in bytes
//	56   8     checkpoint slot size S in bytes
//	64   8     log offset (2*bs + 2*S)
//	72   8     log size L in bytes
//	80   8     checkpoint generation (0: no checkpoint yet)
//	88   4     checkpoint slot (0 or 1)
//	92   4     checkpoint CRC32C (salted) of the slot's first length bytes
//	96   8     checkpoint length in bytes
//	104  8     checkpoint upTo: the last record sequence it reflects
//	112  8     replay start: absolute log position of the first batch to scan
//	120  8     replay start epoch: the least epoch a batch there may carry
//	128  4     CRC32C (salted) of bytes [0, 128)
//
// The log is addressed by absolute position (apos), a byte count that only
// grows; the physical offset is logOffset + apos mod L. It holds batches, each
// written by one group commit, starting on a block boundary and padded to
// one; a batch may wrap from the end of the log to its start.
//
// Batch header, magic "BJBA" (batchHdrSize bytes), followed by its records:
//
//	off  size  field
//	0    4     magic "BJBA"
//	4    4     record count (>= 1)
//	8    8     journal id
//	16   8     apos of this batch (so a stale block from an earlier lap of
//	           the circular log, or a misdirected one, is rejected)
//	24   8     epoch of the Open that wrote it
//	32   8     sequence number of its first record
//	40   4     length in bytes of the records that follow the header
//	44   4     CRC32C (salted) of bytes [0, 44)
//
// Record (recHdrSize bytes, then the payload):
//
//	off  size  field
//	0    4     payload length (<= MaxRecord)
//	4    8     sequence number
//	12   4     CRC32C (salted) of the payload followed by bytes [0, 12)
//
// A batch is valid when its header is and every record's CRC and sequence
// (first, first+1, ...) check; replay delivers no record of a batch that is
// not wholly valid, so a torn batch disappears as a whole.

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

const (
	sbMagic      = "BSNAPJSB"
	sbVersion    = 1
	sbSize       = 132
	batchMagic   = "BJBA"
	batchHdrSize = 48
	recHdrSize   = 16

	// MaxRecord is the largest payload Append accepts.
	MaxRecord = 1 << 20

	// batchTarget is the size past which Append starts a new batch, so a
	// batch's records never exceed batchTarget + one record.
	batchTarget = 1 << 20
	// maxBatchData bounds a batch's record bytes; decoders refuse more.
	maxBatchData = batchTarget + recHdrSize + MaxRecord
)

// CRC salts, one per structure type, so that a structure of one type can
// never pass for another.
const (
	saltSuperblock uint32 = 0x5b1a7c01
	saltBatch      uint32 = 0x5b1a7c02
	saltRecord     uint32 = 0x5b1a7c03
	saltCheckpoint uint32 = 0x5b1a7c04
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(salt uint32, p []byte) uint32 { return crc32.Update(salt, castagnoli, p) }

var le = binary.LittleEndian

// checkpointRef is the superblock's pointer to the current checkpoint and
// where replay starts after it.
type checkpointRef struct {
	gen        uint64 // 0: none
	slot       uint32
	crc        uint32
	length     uint64
	upTo       uint64
	start      uint64 // apos of the first batch to scan
	startEpoch uint64
}

type superblock struct {
	blockSize uint32
	location  uint64
	id        uint64
	gen       uint64
	epoch     uint64
	size      uint64
	slotSize  uint64
	logOff    uint64
	logSize   uint64
	ckpt      checkpointRef
}

func (sb *superblock) encode(b []byte) {
	clear(b[:sbSize])
	copy(b[0:8], sbMagic)
	le.PutUint32(b[8:], sbVersion)
	le.PutUint32(b[12:], sb.blockSize)
	le.PutUint64(b[16:], sb.location)
	le.PutUint64(b[24:], sb.id)
	le.PutUint64(b[32:], sb.gen)
	le.PutUint64(b[40:], sb.epoch)
	le.PutUint64(b[48:], sb.size)
	le.PutUint64(b[56:], sb.slotSize)
	le.PutUint64(b[64:], sb.logOff)
	le.PutUint64(b[72:], sb.logSize)
	le.PutUint64(b[80:], sb.ckpt.gen)
	le.PutUint32(b[88:], sb.ckpt.slot)
	le.PutUint32(b[92:], sb.ckpt.crc)
	le.PutUint64(b[96:], sb.ckpt.length)
	le.PutUint64(b[104:], sb.ckpt.upTo)
	le.PutUint64(b[112:], sb.ckpt.start)
	le.PutUint64(b[120:], sb.ckpt.startEpoch)
	le.PutUint32(b[128:], crc(saltSuperblock, b[:128]))
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// CorruptAtError is an ErrCorrupt that names the structure found damaged
// and its byte offset on the journal's device, so that an engine holding
// the journal in a slice of a larger device can restate the offset on that
// device (errors.As finds it under the engine's wrapping).
type CorruptAtError struct {
	What   string // "superblock" or "checkpoint"
	Off    int64  // byte offset on the journal's device
	Detail string // what is wrong with it
}

func (e *CorruptAtError) Error() string {
	return fmt.Sprintf("%v: %s at %d: %s", ErrCorrupt, e.What, e.Off, e.Detail)
}

// Unwrap makes errors.Is(err, ErrCorrupt) hold.
func (e *CorruptAtError) Unwrap() error { return ErrCorrupt }

// corruptAt returns a *CorruptAtError for the structure what at off.
func corruptAt(what string, off int64, format string, args ...any) error {
	return &CorruptAtError{What: what, Off: off, Detail: fmt.Sprintf(format, args...)}
}

// decodeSuperblock decodes and validates the superblock copy read from
// location loc. It never panics; every failure wraps ErrCorrupt.
func decodeSuperblock(b []byte, loc int64) (superblock, error) {
	var sb superblock
	if len(b) < sbSize {
		return sb, corruptAt("superblock", loc, "%d bytes, want %d", len(b), sbSize)
	}
	if string(b[0:8]) != sbMagic {
		return sb, corruptAt("superblock", loc, "bad magic")
	}
	if got, want := le.Uint32(b[128:]), crc(saltSuperblock, b[:128]); got != want {
		return sb, corruptAt("superblock", loc, "checksum %#x, want %#x", got, want)
	}
	if v := le.Uint32(b[8:]); v != sbVersion {
		return sb, corruptAt("superblock", loc, "version %d, want %d", v, sbVersion)
	}
	sb = superblock{
		blockSize: le.Uint32(b[12:]),
		location:  le.Uint64(b[16:]),
		id:        le.Uint64(b[24:]),
		gen:       le.Uint64(b[32:]),
		epoch:     le.Uint64(b[40:]),
		size:      le.Uint64(b[48:]),
		slotSize:  le.Uint64(b[56:]),
		logOff:    le.Uint64(b[64:]),
		logSize:   le.Uint64(b[72:]),
		ckpt: checkpointRef{
			gen:        le.Uint64(b[80:]),
			slot:       le.Uint32(b[88:]),
			crc:        le.Uint32(b[92:]),
			length:     le.Uint64(b[96:]),
			upTo:       le.Uint64(b[104:]),
			start:      le.Uint64(b[112:]),
			startEpoch: le.Uint64(b[120:]),
		},
	}
	if err := sb.validate(loc); err != nil {
		return superblock{}, err
	}
	return sb, nil
}

// validate checks the superblock's internal consistency (everything that
// does not need the device).
func (sb *superblock) validate(loc int64) error {
	bs := uint64(sb.blockSize)
	bad := func(what string, v uint64) error {
		return corruptAt("superblock", loc, "%s %d", what, v)
	}
	switch {
	case bs < 512 || bs > 1<<16 || bs&(bs-1) != 0:
		return bad("block size", bs)
	case sb.location != uint64(loc) || sb.location%bs != 0:
		return bad("location", sb.location)
	case sb.gen == 0 || sb.gen >= 1<<62 || sb.location > bs:
		return bad("generation", sb.gen)
	case sb.epoch == 0 || sb.epoch >= 1<<62:
		return bad("epoch", sb.epoch)
	case sb.size%bs != 0 || sb.size >= 1<<62:
		return bad("size", sb.size)
	case sb.slotSize == 0 || sb.slotSize%bs != 0 || sb.slotSize > sb.size:
		return bad("checkpoint slot size", sb.slotSize)
	case sb.logOff != 2*bs+2*sb.slotSize:
		return bad("log offset", sb.logOff)
	case sb.logOff > sb.size || sb.logSize != sb.size-sb.logOff || sb.logSize < minLogBlocks*bs:
		return bad("log size", sb.logSize)
	}
	c := sb.ckpt
	switch {
	case c.slot > 1:
		return bad("checkpoint slot", uint64(c.slot))
	case c.length > sb.slotSize:
		return bad("checkpoint length", c.length)
	case c.start%bs != 0 || c.start >= 1<<62:
		return bad("replay start", c.start)
	case c.startEpoch > sb.epoch:
		return bad("replay start epoch", c.startEpoch)
	case c.gen == 0 && (c.slot|c.crc) != 0, c.gen == 0 && (c.length|c.upTo) != 0:
		return bad("empty checkpoint generation", c.gen)
	}
	return nil
}

// batchHeader is a decoded batch header.
type batchHeader struct {
	count    uint32
	id       uint64
	apos     uint64
	epoch    uint64
	firstSeq uint64
	length   uint32
}

func (h *batchHeader) encode(b []byte) {
	copy(b[0:4], batchMagic)
	le.PutUint32(b[4:], h.count)
	le.PutUint64(b[8:], h.id)
	le.PutUint64(b[16:], h.apos)
	le.PutUint64(b[24:], h.epoch)
	le.PutUint64(b[32:], h.firstSeq)
	le.PutUint32(b[40:], h.length)
	le.PutUint32(b[44:], crc(saltBatch, b[:44]))
}

// decodeBatchHeader decodes a batch header found at absolute log position
// apos. Identity (journal id, position, epoch, sequence) is checked by the
// caller, which knows what to expect.
func decodeBatchHeader(b []byte, apos int64) (batchHeader, error) {
	var h batchHeader
	if len(b) < batchHdrSize {
		return h, corruptf("batch at log %d: short header (%d bytes)", apos, len(b))
	}
	if string(b[0:4]) != batchMagic {
		return h, corruptf("batch at log %d: bad magic", apos)
	}
	if got, want := le.Uint32(b[44:]), crc(saltBatch, b[:44]); got != want {
		return h, corruptf("batch at log %d: header checksum %#x, want %#x", apos, got, want)
	}
	h = batchHeader{
		count:    le.Uint32(b[4:]),
		id:       le.Uint64(b[8:]),
		apos:     le.Uint64(b[16:]),
		epoch:    le.Uint64(b[24:]),
		firstSeq: le.Uint64(b[32:]),
		length:   le.Uint32(b[40:]),
	}
	switch {
	case h.length > maxBatchData:
		return batchHeader{}, corruptf("batch at log %d: length %d over %d", apos, h.length, maxBatchData)
	case h.count == 0 || uint64(h.count)*recHdrSize > uint64(h.length):
		return batchHeader{}, corruptf("batch at log %d: %d records in %d bytes", apos, h.count, h.length)
	case h.firstSeq == 0 || h.firstSeq > 1<<62:
		return batchHeader{}, corruptf("batch at log %d: first sequence %d", apos, h.firstSeq)
	}
	return h, nil
}

// putRecordHeader writes a record header for payload (whose salted payload
// CRC is pcrc, from payloadCRC) at b[0:recHdrSize].
func putRecordHeader(b []byte, seq uint64, n int, pcrc uint32) {
	le.PutUint32(b[0:], uint32(n))
	le.PutUint64(b[4:], seq)
	le.PutUint32(b[12:], crc32.Update(pcrc, castagnoli, b[:12]))
}

// payloadCRC is the first half of a record's CRC; it needs no sequence
// number, so Append computes it before taking the journal's lock.
func payloadCRC(p []byte) uint32 { return crc(saltRecord, p) }

// checkRecords validates data, the record bytes of a batch whose header h
// was found at apos: exactly h.count records with sequences h.firstSeq, ...,
// each with a good CRC, filling data exactly.
func checkRecords(data []byte, h batchHeader, apos int64) error {
	off := 0
	for i := uint32(0); i < h.count; i++ {
		seq := h.firstSeq + uint64(i)
		if len(data)-off < recHdrSize {
			return corruptf("batch at log %d: record %d: short header", apos, seq)
		}
		rh := data[off : off+recHdrSize]
		n := int(le.Uint32(rh[0:]))
		if n > MaxRecord || n > len(data)-off-recHdrSize {
			return corruptf("batch at log %d: record %d: length %d", apos, seq, n)
		}
		if s := le.Uint64(rh[4:]); s != seq {
			return corruptf("batch at log %d: record sequence %d, want %d", apos, s, seq)
		}
		payload := data[off+recHdrSize : off+recHdrSize+n]
		want := crc32.Update(payloadCRC(payload), castagnoli, rh[:12])
		if got := le.Uint32(rh[12:]); got != want {
			return corruptf("batch at log %d: record %d: checksum %#x, want %#x", apos, seq, got, want)
		}
		off += recHdrSize + n
	}
	if off != len(data) {
		return corruptf("batch at log %d: %d trailing bytes", apos, len(data)-off)
	}
	return nil
}

// eachRecord calls fn for every record of data, which checkRecords has
// accepted.
func eachRecord(data []byte, fn func(seq uint64, payload []byte) error) error {
	for off := 0; off < len(data); {
		n := int(le.Uint32(data[off:]))
		seq := le.Uint64(data[off+4:])
		if err := fn(seq, data[off+recHdrSize:off+recHdrSize+n]); err != nil {
			return err
		}
		off += recHdrSize + n
	}
	return nil
}

// decodeBatch decodes a whole batch image b (header, then records) found at
// apos and calls fn for each record, only once all of it has been checked.
func decodeBatch(b []byte, apos int64, fn func(seq uint64, payload []byte) error) (batchHeader, error) {
	h, err := decodeBatchHeader(b, apos)
	if err != nil {
		return h, err
	}
	if uint64(len(b)) < batchHdrSize+uint64(h.length) {
		return h, corruptf("batch at log %d: %d bytes, header says %d", apos, len(b), batchHdrSize+h.length)
	}
	data := b[batchHdrSize : batchHdrSize+int(h.length)]
	if err := checkRecords(data, h, apos); err != nil {
		return h, err
	}
	return h, eachRecord(data, fn)
}

// minLogBlocks is the smallest log Format accepts, in blocks.
const minLogBlocks = 4

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }
