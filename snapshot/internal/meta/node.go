package meta

// Tree nodes and their page encodings.
//
// Branch page (typeChunkBranch, typeEpochBranch), count = children (at most
// maxKids), level >= 1, body of 32-byte entries from offset 32:
//
//	offset     size field
//	32+32i     4    key.b
//	32+32i+4   4    key.e
//	32+32i+8   8    key.c
//	32+32i+16  8    child page
//	32+32i+24  8    child transaction id
//
// Leaf page (typeChunkLeaf, typeEpochLeaf), count = runs, level 0: runs
// delta-coded against the previous run (the first against all zeros), from
// offset 32, at most leafCap bytes:
//
//	field      chunk leaf                        epoch leaf
//	1          uvarint(b - prev.b)               uvarint(b - prev.b)
//	2          uvarint(c - prev.c) if b same,    uvarint(e - prev.e) if b same,
//	           else uvarint(c)                   else uvarint(e)
//	3          zigzag(e - prev.e)                zigzag(c - prev.c)
//	4          uvarint(n - 1)                    uvarint(n - 1)
//	5          zigzag(loc - (prev.loc+prev.n))   (none)

import (
	"encoding/binary"
	"math"
	"slices"
	"sync/atomic"
)

const (
	maxKids   = (PageSize - headerSize) / 32
	leafCap   = PageSize - headerSize
	maxRunEnc = 5*binary.MaxVarintLen64 + 2*binary.MaxVarintLen32
)

// LocSpecial: locations at or above it are not data chunks (the store
// encodes "zeros" and "inherit" there). Runs holding them never merge.
const LocSpecial = uint64(1) << 63

// run is n consecutive keys with one start key. In the chunk tree the keys
// are (b, c+i, e) -> loc+i; in the epoch tree they are (b, e, c+i) and loc
// is unused (zero). A branch key is a run whose n and loc are ignored.
type run struct {
	b   uint32
	e   uint32
	c   uint64
	loc uint64
	n   uint32
}

// kind selects a tree: its key order, its page types and its leaf coding.
type kind uint8

const (
	chunkTree kind = iota // order (b, c, e); runs vary c; loc kept
	epochTree             // order (b, e, c); runs vary c; no loc
)

func (k kind) branchType() uint16 {
	if k == chunkTree {
		return typeChunkBranch
	}
	return typeEpochBranch
}

func (k kind) leafType() uint16 {
	if k == chunkTree {
		return typeChunkLeaf
	}
	return typeEpochLeaf
}

func cmp3(a1, b1 uint32, a2, b2 uint64, a3, b3 uint64) int {
	switch {
	case a1 < b1:
		return -1
	case a1 > b1:
		return 1
	case a2 < b2:
		return -1
	case a2 > b2:
		return 1
	case a3 < b3:
		return -1
	case a3 > b3:
		return 1
	}
	return 0
}

// cmp compares the start keys of x and y in the tree's order.
func (k kind) cmp(x, y run) int {
	if k == chunkTree {
		return cmp3(x.b, y.b, x.c, y.c, uint64(x.e), uint64(y.e))
	}
	return cmp3(x.b, y.b, uint64(x.e), uint64(y.e), x.c, y.c)
}

// before returns how many of r's keys are less than the key q.
func (k kind) before(r, q run) uint64 {
	if r.b != q.b {
		if r.b < q.b {
			return uint64(r.n)
		}
		return 0
	}
	if k == epochTree && r.e != q.e {
		if r.e < q.e {
			return uint64(r.n)
		}
		return 0
	}
	if q.c < r.c {
		return 0
	}
	if q.c-r.c >= uint64(r.n) {
		return uint64(r.n)
	}
	i := q.c - r.c
	if k == chunkTree && r.e < q.e {
		i++
	}
	return i
}

// contains reports whether key q is one of r's keys.
func (k kind) contains(r, q run) bool {
	return r.b == q.b && r.e == q.e && q.c >= r.c && q.c-r.c < uint64(r.n)
}

// at returns r's i-th key as a run of one.
func (k kind) at(r run, i uint64) run {
	x := run{b: r.b, e: r.e, c: r.c + i, n: 1}
	if k == chunkTree && r.loc < LocSpecial {
		x.loc = r.loc + i
	} else {
		x.loc = r.loc
	}
	return x
}

// slice returns r's keys [i, j) as a run; j > i.
func (k kind) slice(r run, i, j uint64) run {
	x := k.at(r, i)
	x.n = uint32(j - i)
	return x
}

// mergeable reports whether run y starts right where x ends, so that the
// two (adjacent in the tree) can be one run.
func (k kind) mergeable(x, y run) bool {
	if x.b != y.b || x.e != y.e || x.c+uint64(x.n) != y.c || uint64(x.n)+uint64(y.n) > math.MaxUint32 {
		return false
	}
	if k == chunkTree {
		return x.loc < LocSpecial && y.loc < LocSpecial && x.loc+uint64(x.n) == y.loc
	}
	return true
}

// last returns r's greatest key as a run of one.
func (k kind) last(r run) run { return k.at(r, uint64(r.n)-1) }

// encRun appends run x coded against prev.
func (k kind) encRun(dst []byte, prev, x run) []byte {
	dst = binary.AppendUvarint(dst, uint64(x.b-prev.b))
	if k == chunkTree {
		if x.b == prev.b {
			dst = binary.AppendUvarint(dst, x.c-prev.c)
		} else {
			dst = binary.AppendUvarint(dst, x.c)
		}
		dst = binary.AppendUvarint(dst, zigzag(int64(int32(x.e-prev.e))))
		dst = binary.AppendUvarint(dst, uint64(x.n-1))
		return binary.AppendUvarint(dst, zigzag(int64(x.loc-(prev.loc+uint64(prev.n)))))
	}
	if x.b == prev.b {
		dst = binary.AppendUvarint(dst, uint64(x.e-prev.e))
	} else {
		dst = binary.AppendUvarint(dst, uint64(x.e))
	}
	dst = binary.AppendUvarint(dst, zigzag(int64(x.c-prev.c)))
	return binary.AppendUvarint(dst, uint64(x.n-1))
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// encLen is len(encRun(nil, prev, x)) without encoding.
func (k kind) encLen(prev, x run) int {
	n := uvarintLen(uint64(x.b - prev.b))
	if k == chunkTree {
		if x.b == prev.b {
			n += uvarintLen(x.c - prev.c)
		} else {
			n += uvarintLen(x.c)
		}
		n += uvarintLen(zigzag(int64(int32(x.e - prev.e))))
		n += uvarintLen(uint64(x.n - 1))
		return n + uvarintLen(zigzag(int64(x.loc-(prev.loc+uint64(prev.n)))))
	}
	if x.b == prev.b {
		n += uvarintLen(uint64(x.e - prev.e))
	} else {
		n += uvarintLen(uint64(x.e))
	}
	n += uvarintLen(zigzag(int64(x.c - prev.c)))
	return n + uvarintLen(uint64(x.n-1))
}

// readFields reads len(f) uvarints from body at off into f and returns the
// offset past them, or -1 if body is short or a varint overlong. Most of a
// leaf's fields are one byte: that case stays in the loop.
func readFields(body []byte, off int, f []uint64) int {
	for j := range f {
		if uint(off) >= uint(len(body)) {
			return -1
		}
		if b := body[off]; b < 0x80 {
			f[j] = uint64(b)
			off++
			continue
		}
		v, m := binary.Uvarint(body[off:])
		if m <= 0 {
			return -1
		}
		f[j] = v
		off += m
	}
	return off
}

// decodeChunkRuns decodes len(runs) chunk-tree runs from a leaf body into
// runs and returns the bytes used. It decodes each run and checks it
// (order, no wrap, special locations) in one loop written out for the
// chunk tree, with a one-byte fast path for the varints: a leaf read from
// disk is decoded whole, and with a tree larger than the cache every
// random insert decodes one or two, so this loop is the random fill's
// hottest. lead7RefDecodeRuns (a test) is the plain field-by-field
// decoder it must agree with, error for error.
func decodeChunkRuns(body []byte, runs []run, loc uint64) (int, error) {
	var prev run
	off := 0
	for i := range runs {
		var f [5]uint64
		if off = readFields(body, off, f[:]); off < 0 || f[0] > math.MaxUint32 || f[3] >= math.MaxUint32 {
			return 0, corrupt(loc, "run %d undecodable", i)
		}
		x := run{b: prev.b + uint32(f[0]), n: uint32(f[3]) + 1, c: f[1]}
		if x.b == prev.b {
			x.c = prev.c + f[1]
		}
		x.e = prev.e + uint32(int32(unzigzag(f[2])))
		x.loc = prev.loc + uint64(prev.n) + uint64(unzigzag(f[4]))
		// Order (b, c, e) after prev's last key (prev.b, prev.c+prev.n-1, prev.e).
		if i > 0 && cmp3(prev.b, x.b, prev.c+uint64(prev.n)-1, x.c, uint64(prev.e), uint64(x.e)) >= 0 {
			return 0, corrupt(loc, "run %d out of order or overlapping", i)
		}
		if x.c+uint64(x.n)-1 < x.c {
			return 0, corrupt(loc, "run %d wraps the chunk space", i)
		}
		if x.loc < LocSpecial && x.loc+uint64(x.n) > LocSpecial {
			return 0, corrupt(loc, "run %d crosses the special locations", i)
		}
		if x.loc >= LocSpecial && x.n != 1 {
			return 0, corrupt(loc, "run %d: special location with %d keys", i, x.n)
		}
		runs[i] = x
		prev = x
	}
	return off, nil
}

// decodeEpochRuns is decodeChunkRuns for the epoch tree (order (b, e, c),
// no locations).
func decodeEpochRuns(body []byte, runs []run, loc uint64) (int, error) {
	var prev run
	off := 0
	for i := range runs {
		var f [4]uint64
		if off = readFields(body, off, f[:]); off < 0 || f[0] > math.MaxUint32 || f[3] >= math.MaxUint32 || f[1] > math.MaxUint32 {
			return 0, corrupt(loc, "run %d undecodable", i)
		}
		x := run{b: prev.b + uint32(f[0]), n: uint32(f[3]) + 1, e: uint32(f[1])}
		if x.b == prev.b {
			x.e = prev.e + uint32(f[1])
		}
		x.c = prev.c + uint64(unzigzag(f[2]))
		// Order (b, e, c) after prev's last key (prev.b, prev.e, prev.c+prev.n-1).
		if i > 0 && cmp3(prev.b, x.b, uint64(prev.e), uint64(x.e), prev.c+uint64(prev.n)-1, x.c) >= 0 {
			return 0, corrupt(loc, "run %d out of order or overlapping", i)
		}
		if x.c+uint64(x.n)-1 < x.c {
			return 0, corrupt(loc, "run %d wraps the chunk space", i)
		}
		runs[i] = x
		prev = x
	}
	return off, nil
}

// node is a decoded tree page. Committed nodes (tx below the writer's
// transaction) are immutable and shared with views; the writer changes
// only nodes of its own transaction.
type node struct {
	loc   uint64
	tx    uint64
	kind  kind
	level uint16
	runs  []run // leaf: the runs; branch: the children's first keys
	// base, when runs is a suffix of it, is runs' whole backing array:
	// the slots before runs[0] are free, so a leaf insert or delete in
	// the first half moves the runs before it rather than after it
	// (insertRun, deleteRun). nil or stale (runs reallocated since)
	// otherwise; frontRoom checks.
	base  []run
	kids  []ptr // branch only
	size  int   // leaf only: encoded body size
	dirty bool
	gen   uint64 // bumped each time the writer takes the node to change it
	// wbBusy: the node's page is queued to the write-back goroutine and
	// not reaped yet, so write-back skips it. Guarded by Meta.mu.
	wbBusy bool

	// cache bookkeeping, guarded by cache.mu
	prev, next   *node // CLOCK ring
	dprev, dnext *node // dirty FIFO
	cost         int
	inCache      bool
	// ref is the CLOCK referenced bit: set by lookups (with no lock, or
	// cache.mu shared), cleared by eviction under cache.mu exclusively.
	ref atomic.Bool
	// pins counts the Pins holding the node (PinPaths): eviction passes
	// over it while positive. Raised under cache.mu shared while the node
	// is in the map, lowered by Unpin with no lock.
	pins atomic.Int32
}

func (n *node) leaf() bool { return n.level == 0 }

// leafSize computes the encoded body size of runs.
func (k kind) leafSize(runs []run) int {
	s, prev := 0, run{}
	for _, r := range runs {
		s += k.encLen(prev, r)
		prev = r
	}
	return s
}

// encode writes n into page p (PageSize bytes).
func (n *node) encode(p []byte) { encodeNode(p, n.kind, n.loc, n.tx, n.level, n.runs, n.kids) }

// encodeNode encodes a node of tree k at loc, written by tx, at level,
// with runs (and kids, for a branch) into page p. The write-back
// goroutine encodes from a copy of a node's runs (wbSlot), so that the
// writer does not spend its lock on it.
func encodeNode(p []byte, k kind, loc, tx uint64, level uint16, runs []run, kids []ptr) {
	clear(p[headerSize:])
	h := header{loc: loc, tx: tx, level: level, count: uint16(len(runs))}
	if level == 0 {
		h.typ = k.leafType()
		buf, prev := p[headerSize:headerSize], run{}
		for _, r := range runs {
			buf = k.encRun(buf, prev, r)
			prev = r
		}
	} else {
		h.typ = k.branchType()
		for i, r := range runs {
			q := p[headerSize+32*i:]
			binary.LittleEndian.PutUint32(q, r.b)
			binary.LittleEndian.PutUint32(q[4:], r.e)
			binary.LittleEndian.PutUint64(q[8:], r.c)
			binary.LittleEndian.PutUint64(q[16:], kids[i].loc)
			binary.LittleEndian.PutUint64(q[24:], kids[i].tx)
		}
	}
	seal(p, h)
}

// decodeNode validates page p read from loc as a node of tree k, written
// by transaction tx (0: any), at level (-1: any), and decodes it.
func decodeNode(p []byte, loc uint64, k kind, tx uint64, level int) (*node, error) {
	typ := k.leafType()
	if level != 0 {
		typ = k.branchType()
	}
	h, err := openPage(p, loc, typ, tx)
	if err != nil && level < 0 {
		typ = k.leafType()
		h, err = openPage(p, loc, typ, tx)
	}
	if err != nil {
		return nil, err
	}
	if level >= 0 && int(h.level) != level {
		return nil, corrupt(loc, "level %d, want %d", h.level, level)
	}
	if (typ == k.leafType()) != (h.level == 0) {
		return nil, corrupt(loc, "type %d at level %d", typ, h.level)
	}
	n := &node{loc: loc, tx: h.tx, kind: k, level: h.level}
	if h.count == 0 {
		return nil, corrupt(loc, "empty node")
	}
	if n.leaf() {
		if int(h.count) > leafCap {
			return nil, corrupt(loc, "%d runs", h.count)
		}
		// Room for one change (a put that splits a run adds two) without
		// growing: a node of the open transaction that was written back,
		// evicted and read again is changed in place, and growing it
		// would copy the runs and double its cache cost on every such
		// round trip.
		n.runs = make([]run, int(h.count), int(h.count)+2)
		var off int
		if k == chunkTree {
			off, err = decodeChunkRuns(p[headerSize:], n.runs, loc)
		} else {
			off, err = decodeEpochRuns(p[headerSize:], n.runs, loc)
		}
		if err != nil {
			return nil, err
		}
		for _, b := range p[headerSize+off:] {
			if b != 0 {
				return nil, corrupt(loc, "bytes after the last run")
			}
		}
		n.size = off
		return n, nil
	}
	if int(h.count) > maxKids {
		return nil, corrupt(loc, "%d children", h.count)
	}
	n.runs = make([]run, h.count, int(h.count)+1) // room for one split below
	n.kids = make([]ptr, h.count, int(h.count)+1)
	for i := range n.runs {
		q := p[headerSize+32*i:]
		n.runs[i] = run{b: binary.LittleEndian.Uint32(q), e: binary.LittleEndian.Uint32(q[4:]), c: binary.LittleEndian.Uint64(q[8:])}
		n.kids[i] = ptr{loc: binary.LittleEndian.Uint64(q[16:]), tx: binary.LittleEndian.Uint64(q[24:])}
		if n.kids[i].loc < 2 || n.kids[i].tx == 0 || n.kids[i].tx > h.tx {
			return nil, corrupt(loc, "child %d pointer (%d, %d)", i, n.kids[i].loc, n.kids[i].tx)
		}
		if i > 0 && k.cmp(n.runs[i-1], n.runs[i]) >= 0 {
			return nil, corrupt(loc, "key %d out of order", i)
		}
	}
	for _, b := range p[headerSize+32*int(h.count):] {
		if b != 0 {
			return nil, corrupt(loc, "bytes after the last child")
		}
	}
	return n, nil
}

// frontRoom is the number of free slots of n's backing array before
// runs[0] (see node.base); 0 when base is nil or stale.
func (n *node) frontRoom() int {
	c := cap(n.runs)
	if c > 0 && len(n.base) > c && &n.base[len(n.base)-c] == &n.runs[:c][0] {
		return len(n.base) - c
	}
	return 0
}

// backing is the number of runs n's backing array holds, front room
// included: what the node costs the cache.
func (n *node) backing() int { return cap(n.runs) + n.frontRoom() }

// minShift is the leaf size below which inserts and deletes always move
// the tail: moving a few runs costs less than keeping front room.
const minShift = 64

// insertRun inserts r at index i of leaf n's runs, moving the shorter side.
// A leaf holds hundreds of runs (a 4 KiB page of small deltas decodes to
// 32 bytes a run), and a copy-on-write puts one in each tree at a random
// place: moving the shorter side halves what each insert moves. A leaf
// that runs out of room on the side it needs is reallocated with an
// eighth of its runs free at each end (what append's growth would add).
func insertRun(n *node, i int, r run) {
	l := len(n.runs)
	if l < minShift {
		if l == cap(n.runs) {
			n.base = nil // the Insert reallocates: keep no stale base
		}
		n.runs = slices.Insert(n.runs, i, r)
		return
	}
	front := i < l/2
	if front && n.frontRoom() == 0 || !front && l == cap(n.runs) {
		h := l / 8
		base := make([]run, h+l+h)
		copy(base[h:], n.runs)
		n.base, n.runs = base, base[h:h+l]
	}
	if !front {
		n.runs = n.runs[:l+1]
		copy(n.runs[i+1:], n.runs[i:l])
		n.runs[i] = r
		return
	}
	at := len(n.base) - cap(n.runs)
	n.runs = n.base[at-1 : at+l]
	copy(n.runs[:i], n.runs[1:i+1])
	n.runs[i] = r
}

// deleteRun removes run i of leaf n, moving the shorter side (the front
// part one slot up, into front room then).
func deleteRun(n *node, i int) {
	l := len(n.runs)
	if i >= l/2 || l < minShift {
		n.runs = slices.Delete(n.runs, i, i+1)
		return
	}
	if n.frontRoom() == 0 {
		n.base = n.runs[:cap(n.runs)]
	}
	copy(n.runs[1:i+1], n.runs[:i])
	n.runs[0] = run{}
	n.runs = n.runs[1:]
}
