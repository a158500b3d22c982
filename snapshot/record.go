package snapshot

// Journal record payloads. A record is one atomic transaction: a version
// byte followed by operations; the journal adds the sequence number, the
// length and the CRC32C. Each operation is a type byte followed by unsigned
// varints (uv) in this order:
//
//	type  name        fields
//	   1  put         branch, epoch, chunk, count, loc   count entries (b, chunk+i, epoch);
//	                                                      loc 0 = zero, 1 = inherit, else
//	                                                      store chunk loc-2+i
//	   2  del         branch, epoch, chunk, count        remove count entries
//	   3  move        branch, chunk, from, to            re-key one entry to another epoch
//	   4  branch      id, parent, parentEpoch            a new live branch (a clone)
//	   5  dropBranch  id                                 remove a dead, empty branch
//	   6  volume      id, kind, branch, epoch, hidden,   a new snapshot or clone volume
//	                  created (unix ns), parent, len, name
//	   7  hide        id                                 a deleted snapshot kept as a hidden parent
//	   8  dropVolume  id                                 a deleted volume
//	   9  rename      id, len, name
//	  10  protect     id, on (0/1)                       Protect or Unprotect a volume
//	  11  create      id, branch, size, created (sv),    a blank volume on a new root branch
//	                  len, name                          (a branch with no parent)
//	  12  resize      id, size                           a clone's or blank volume's new size
//	                                                     in bytes
//
// Decoders bound every count by the bytes that remain, and never panic.

import (
	"encoding/binary"
	"fmt"
)

const recordVersion = 1

type opKind uint8

const (
	opPut opKind = iota + 1
	opDel
	opMove
	opBranch
	opDropBranch
	opVolume
	opHide
	opDropVolume
	opRename
	opProtect
	opCreate
	opResize
	opMax
)

// maxNameLen bounds volume names.
const maxNameLen = 255

// op is one decoded operation; which fields count depends on kind.
type op struct {
	kind   opKind
	b      uint32 // put, del, move: branch; branch: parent; volume: branch
	e      uint32 // put, del: epoch; move: from; branch: parent epoch; volume: epoch
	e2     uint32 // move: to
	c      uint64 // put, del, move: chunk
	n      uint64 // put, del: count
	loc    uint64 // put: first location (locZero, locInherit or a store chunk)
	id     uint64 // branch, dropBranch: branch id; volume, hide, dropVolume, rename: volume id
	vkind  Kind
	hidden bool
	time   int64
	parent uint64
	name   string
	on     bool  // protect: on or off
	size   int64 // create, resize: the volume's size in bytes
}

func encodeLoc(loc uint64) uint64 {
	switch loc {
	case locZero:
		return 0
	case locInherit:
		return 1
	}
	return loc + 2
}

func decodeLoc(v uint64) uint64 {
	switch v {
	case 0:
		return locZero
	case 1:
		return locInherit
	}
	return v - 2
}

// appendOp encodes o onto b.
func appendOp(b []byte, o *op) []byte {
	b = append(b, byte(o.kind))
	u := binary.AppendUvarint
	switch o.kind {
	case opPut:
		b = u(u(u(u(u(b, uint64(o.b)), uint64(o.e)), o.c), o.n), encodeLoc(o.loc))
	case opDel:
		b = u(u(u(u(b, uint64(o.b)), uint64(o.e)), o.c), o.n)
	case opMove:
		b = u(u(u(u(b, uint64(o.b)), o.c), uint64(o.e)), uint64(o.e2))
	case opBranch:
		b = u(u(u(b, o.id), uint64(o.b)), uint64(o.e))
	case opDropBranch, opHide, opDropVolume:
		b = u(b, o.id)
	case opVolume:
		h := uint64(0)
		if o.hidden {
			h = 1
		}
		b = u(u(u(u(u(b, o.id), uint64(o.vkind)), uint64(o.b)), uint64(o.e)), h)
		b = binary.AppendVarint(b, o.time)
		b = u(u(b, o.parent), uint64(len(o.name)))
		b = append(b, o.name...)
	case opRename:
		b = u(u(b, o.id), uint64(len(o.name)))
		b = append(b, o.name...)
	case opProtect:
		b = u(u(b, o.id), b2u(o.on))
	case opCreate:
		b = u(u(u(b, o.id), uint64(o.b)), uint64(o.size))
		b = binary.AppendVarint(b, o.time)
		b = u(b, uint64(len(o.name)))
		b = append(b, o.name...)
	case opResize:
		b = u(u(b, o.id), uint64(o.size))
	}
	return b
}

// encodeRecord encodes ops as one record payload onto buf[:0].
func encodeRecord(buf []byte, ops []op) []byte {
	buf = append(buf[:0], recordVersion)
	for i := range ops {
		buf = appendOp(buf, &ops[i])
	}
	return buf
}

// decoder reads varints from a bounded buffer; the first error sticks.
type decoder struct {
	b   []byte
	off int
	err error
	at  string // where the buffer came from, for errors
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s, byte %d: %s", ErrCorrupt, d.at, d.off, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) uv() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b[d.off:])
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) sv() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b[d.off:])
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) u32() uint32 {
	v := d.uv()
	if v > 0xffffffff {
		d.fail("value %d does not fit 32 bits", v)
	}
	return uint32(v)
}

func (d *decoder) byte1() byte {
	if d.err != nil {
		return 0
	}
	if d.off >= len(d.b) {
		d.fail("truncated")
		return 0
	}
	v := d.b[d.off]
	d.off++
	return v
}

func (d *decoder) str() string {
	n := d.uv()
	if d.err != nil {
		return ""
	}
	if n > maxNameLen || n > uint64(len(d.b)-d.off) {
		d.fail("name of %d bytes", n)
		return ""
	}
	s := string(d.b[d.off : d.off+int(n)])
	d.off += int(n)
	return s
}

// volSize reads a volume size: positive and at most maxVolumeBound.
func (d *decoder) volSize() int64 {
	v := d.uv()
	if d.err == nil && (v == 0 || v > maxVolumeBound) {
		d.fail("volume size %d", v)
	}
	return int64(v)
}

func (d *decoder) done() bool { return d.err != nil || d.off >= len(d.b) }

// decodeOp reads one operation.
func (d *decoder) op(o *op) {
	*o = op{kind: opKind(d.byte1())}
	switch o.kind {
	case opPut:
		o.b, o.e, o.c, o.n, o.loc = d.u32(), d.u32(), d.uv(), d.uv(), decodeLoc(d.uv())
	case opDel:
		o.b, o.e, o.c, o.n = d.u32(), d.u32(), d.uv(), d.uv()
	case opMove:
		o.b, o.c, o.e, o.e2 = d.u32(), d.uv(), d.u32(), d.u32()
	case opBranch:
		o.id, o.b, o.e = d.uv(), d.u32(), d.u32()
	case opDropBranch, opHide, opDropVolume:
		o.id = d.uv()
	case opVolume:
		o.id = d.uv()
		k := d.uv()
		if k < uint64(KindSnapshot) || k > uint64(KindClone) {
			d.fail("volume kind %d", k)
		}
		o.vkind = Kind(k)
		o.b, o.e = d.u32(), d.u32()
		h := d.uv()
		if h > 1 {
			d.fail("hidden flag %d", h)
		}
		o.hidden = h == 1
		o.time = d.sv()
		o.parent = d.uv()
		o.name = d.str()
	case opRename:
		o.id = d.uv()
		o.name = d.str()
	case opProtect:
		o.id = d.uv()
		on := d.uv()
		if on > 1 {
			d.fail("protect flag %d", on)
		}
		o.on = on == 1
	case opCreate:
		o.id, o.b = d.uv(), d.u32()
		o.size = d.volSize()
		o.time = d.sv()
		o.name = d.str()
	case opResize:
		o.id = d.uv()
		o.size = d.volSize()
	default:
		d.fail("unknown operation %d", o.kind)
	}
	if (o.kind == opPut || o.kind == opDel) && d.err == nil {
		if o.n == 0 || o.n > 1<<40 || o.c+o.n < o.c {
			d.fail("entry count %d at chunk %d", o.n, o.c)
		}
		if o.kind == opPut && o.loc < locInherit && o.loc+o.n < o.loc {
			d.fail("location run %d+%d", o.loc, o.n)
		}
	}
}

// decodeRecord parses a record payload into ops (appended to dst).
func decodeRecord(dst []op, payload []byte, at string) ([]op, error) {
	d := decoder{b: payload, at: at}
	if v := d.byte1(); d.err == nil && v != recordVersion {
		d.fail("record version %d", v)
	}
	for !d.done() {
		var o op
		d.op(&o)
		if d.err == nil {
			dst = append(dst, o)
		}
	}
	return dst, d.err
}
