package meta

// Superblock (typeSuper), two copies: page 0 holds even transaction ids,
// page 1 odd ones. The common header's tx is the commit's sequence number.
//
//	offset size    field
//	0      32      common header (location 0 or 1, tx = sequence)
//	32     8       magic "BSMETA01"
//	40     4       format version (2; version 1 had no user word)
//	44     4       page size (4096)
//	48     8       metadata pages in the region
//	56     8       data chunks in the space map
//	64     16      chunk-tree root (page, tx); zero: empty tree
//	80     16      epoch-tree root (page, tx); zero: empty tree
//	96     8       keys
//	104    8       chunk-tree runs
//	112    8       epoch-tree runs
//	120    8       metadata pages in use
//	128    8       data chunks in use
//	136    4       metadata bitmap index pages (m)
//	140    4       data bitmap index pages (d)
//	144    2       chunk-tree root level
//	146    2       epoch-tree root level
//	148    4       extents (x; version 3, zero in version 2)
//	152    8       user word: the store records the last journal record the
//	               commit covers (opaque to this package)
//	160    16(m+d) (page, tx) of each index page, metadata ones first
//	...    16x     (first data chunk, data chunks) of each extent (extent.go)
//
// Version 3 is written only by a region that has extents, so one that
// never grew stays readable by the code of version 2.

import (
	"encoding/binary"
	"fmt"
)

const (
	superMagic   = "BSMETA01"
	superVersion = 3
	noExtVersion = 2 // superblocks of regions without extents
	superFixed   = 160
	maxIdxPtrs   = (PageSize - superFixed) / 16
)

type super struct {
	tx                 uint64
	pages, dataChunks  uint64
	chunkRoot          ptr
	epochRoot          ptr
	chunkLevel         uint16
	epochLevel         uint16
	keys               uint64
	chunkRuns          uint64
	epochRuns          uint64
	metaUsed, dataUsed uint64
	metaIdx, dataIdx   []ptr
	user               uint64
	ext                []extent
}

func (s *super) encode(p []byte) {
	clear(p)
	copy(p[32:], superMagic)
	le := binary.LittleEndian
	le.PutUint32(p[40:], noExtVersion)
	if len(s.ext) > 0 {
		le.PutUint32(p[40:], superVersion)
	}
	le.PutUint32(p[44:], PageSize)
	le.PutUint64(p[48:], s.pages)
	le.PutUint64(p[56:], s.dataChunks)
	le.PutUint64(p[64:], s.chunkRoot.loc)
	le.PutUint64(p[72:], s.chunkRoot.tx)
	le.PutUint64(p[80:], s.epochRoot.loc)
	le.PutUint64(p[88:], s.epochRoot.tx)
	le.PutUint64(p[96:], s.keys)
	le.PutUint64(p[104:], s.chunkRuns)
	le.PutUint64(p[112:], s.epochRuns)
	le.PutUint64(p[120:], s.metaUsed)
	le.PutUint64(p[128:], s.dataUsed)
	le.PutUint32(p[136:], uint32(len(s.metaIdx)))
	le.PutUint32(p[140:], uint32(len(s.dataIdx)))
	le.PutUint16(p[144:], s.chunkLevel)
	le.PutUint16(p[146:], s.epochLevel)
	le.PutUint64(p[152:], s.user)
	for i, q := range append(append([]ptr(nil), s.metaIdx...), s.dataIdx...) {
		le.PutUint64(p[superFixed+16*i:], q.loc)
		le.PutUint64(p[superFixed+16*i+8:], q.tx)
	}
	encodeExtents(p, superFixed+16*(len(s.metaIdx)+len(s.dataIdx)), s.ext)
	seal(p, header{typ: typeSuper, loc: s.tx % 2, tx: s.tx})
}

// decodeSuper validates superblock copy slot (0 or 1) and decodes it.
func decodeSuper(p []byte, slot uint64) (*super, error) {
	h, err := openPage(p, slot, typeSuper, 0)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if string(p[32:40]) != superMagic {
		return nil, corrupt(slot, "bad superblock magic %q", p[32:40])
	}
	v := le.Uint32(p[40:])
	if v != superVersion && v != noExtVersion {
		return nil, corrupt(slot, "superblock version %d, want %d or %d", v, noExtVersion, superVersion)
	}
	if ps := le.Uint32(p[44:]); ps != PageSize {
		return nil, corrupt(slot, "page size %d, want %d", ps, PageSize)
	}
	if h.tx == 0 || h.tx%2 != slot || h.count != 0 || h.level != 0 {
		return nil, corrupt(slot, "superblock sequence %d in copy %d", h.tx, slot)
	}
	s := &super{tx: h.tx}
	s.pages, s.dataChunks = le.Uint64(p[48:]), le.Uint64(p[56:])
	s.chunkRoot = ptr{le.Uint64(p[64:]), le.Uint64(p[72:])}
	s.epochRoot = ptr{le.Uint64(p[80:]), le.Uint64(p[88:])}
	s.keys, s.chunkRuns, s.epochRuns = le.Uint64(p[96:]), le.Uint64(p[104:]), le.Uint64(p[112:])
	s.metaUsed, s.dataUsed = le.Uint64(p[120:]), le.Uint64(p[128:])
	m, d := le.Uint32(p[136:]), le.Uint32(p[140:])
	s.chunkLevel, s.epochLevel = le.Uint16(p[144:]), le.Uint16(p[146:])
	s.user = le.Uint64(p[152:])
	x := le.Uint32(p[148:])
	if (x == 0) != (v == noExtVersion) || x > maxExtents {
		return nil, corrupt(slot, "%d extents in a version %d superblock", x, v)
	}
	if uint64(m)+uint64(d)+uint64(x) > maxIdxPtrs {
		return nil, corrupt(slot, "%d+%d index pages and %d extents", m, d, x)
	}
	if s.pages < 3 || s.metaUsed > s.pages || s.dataUsed > s.dataChunks {
		return nil, corrupt(slot, "counts: %d pages, %d used; %d chunks, %d used", s.pages, s.metaUsed, s.dataChunks, s.dataUsed)
	}
	if int(m) != idxFor(pagesFor(s.pages)) || int(d) != idxFor(pagesFor(s.dataChunks)) {
		return nil, corrupt(slot, "index page counts %d, %d do not fit the map sizes", m, d)
	}
	for _, r := range []ptr{s.chunkRoot, s.epochRoot} {
		if r.isNil() != (r.tx == 0) || !r.isNil() && (r.loc < 2 || r.loc >= s.pages || r.tx > s.tx) {
			return nil, corrupt(slot, "root pointer (%d, %d)", r.loc, r.tx)
		}
	}
	if s.chunkRoot.isNil() != s.epochRoot.isNil() || s.chunkRoot.isNil() != (s.keys == 0) {
		return nil, corrupt(slot, "roots and key count disagree")
	}
	all := make([]ptr, m+d)
	for i := range all {
		all[i] = ptr{le.Uint64(p[superFixed+16*i:]), le.Uint64(p[superFixed+16*i+8:])}
		if all[i].loc < 2 || all[i].loc >= s.pages || all[i].tx == 0 || all[i].tx > s.tx {
			return nil, corrupt(slot, "index pointer %d (%d, %d)", i, all[i].loc, all[i].tx)
		}
	}
	if x > 0 {
		s.ext = decodeExtents(p, superFixed+16*len(all), int(x))
	}
	for _, b := range p[superFixed+16*(len(all)+int(x)):] {
		if b != 0 {
			return nil, corrupt(slot, "bytes after the index pointers and extents")
		}
	}
	s.metaIdx, s.dataIdx = all[:m], all[m:]
	return s, nil
}

func (s *super) String() string {
	return fmt.Sprintf("super{tx %d, %d pages (%d used), %d chunks (%d used), %d keys}", s.tx, s.pages, s.metaUsed, s.dataChunks, s.dataUsed, s.keys)
}
