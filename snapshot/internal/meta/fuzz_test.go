package meta

import (
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// Fuzz targets for every page decoder. The input becomes one page; each
// target decodes it as it is and again with the checksum recomputed, so
// the fuzzer gets past the checksum into the body. A decoder must return a
// value or an error, never panic.

// fuzzPage copies data into a page and returns it, and a copy resealed
// with a valid checksum for type typ.
func fuzzPage(data []byte, typ uint16) (raw, sealed []byte) {
	raw = make([]byte, PageSize)
	copy(raw, data)
	sealed = append([]byte(nil), raw...)
	binary.LittleEndian.PutUint16(sealed[4:], typ)
	binary.LittleEndian.PutUint32(sealed, crc32.Update(seed(typ), castagnoli, sealed[4:]))
	return raw, sealed
}

// seedNode encodes a small valid node of tree k at level.
func seedNode(k kind, level uint16) []byte {
	n := &node{loc: 5, tx: 3, kind: k, level: level}
	n.runs = []run{{b: 0, c: 1, e: 2, n: 3, loc: 10}, {b: 0, c: 9, e: 1, n: 1, loc: 40}, {b: 2, c: 0, e: 7, n: 1, loc: LocSpecial}}
	if level > 0 {
		n.kids = []ptr{{6, 2}, {7, 3}, {8, 1}}
	}
	if k == epochTree {
		for i := range n.runs {
			n.runs[i].loc = 0
		}
	}
	p := make([]byte, PageSize)
	n.encode(p)
	return p[:headerSize+64]
}

func FuzzDecodeNode(f *testing.F) {
	for _, k := range []kind{chunkTree, epochTree} {
		f.Add(seedNode(k, 0), uint8(k), uint8(0))
		f.Add(seedNode(k, 1), uint8(k), uint8(1))
	}
	f.Fuzz(func(t *testing.T, data []byte, kb, level uint8) {
		k := kind(kb % 2)
		lv := int(level%4) - 1
		typ := k.leafType()
		if lv != 0 {
			typ = k.branchType()
		}
		raw, sealed := fuzzPage(data, typ)
		for _, p := range [][]byte{raw, sealed} {
			n, err := decodeNode(p, 5, k, 0, lv)
			if err == nil {
				// what decodes must re-encode to a page that decodes the same
				q := make([]byte, PageSize)
				n.encode(q)
				m, err := decodeNode(q, 5, k, n.tx, int(n.level))
				if err != nil || len(m.runs) != len(n.runs) {
					t.Fatalf("re-encoded node does not decode: %v", err)
				}
			}
		}
	})
}

func FuzzDecodeSuper(f *testing.F) {
	s := super{tx: 3, pages: 100, dataChunks: 1000, keys: 0, metaIdx: []ptr{{4, 3}}, dataIdx: []ptr{{5, 2}}}
	p := make([]byte, PageSize)
	s.encode(p)
	f.Add(p[:superFixed+32])
	s.pages, s.ext = 164, []extent{{chunk: 900, chunks: 1}} // a grown region (extent.go)
	s.encode(p)
	f.Add(p[:superFixed+48])
	f.Fuzz(func(t *testing.T, data []byte) {
		raw, sealed := fuzzPage(data, typeSuper)
		for _, p := range [][]byte{raw, sealed} {
			_, _ = decodeSuper(p, 1)
		}
	})
}

func FuzzDecodeBitmap(f *testing.F) {
	sm := newSpaceMap(40000)
	sm.set(3)
	sm.set(39999)
	p := make([]byte, PageSize)
	sm.encodeBitmap(p, 1, 9, 4)
	f.Add(p[:headerSize+16], uint16(1))
	f.Fuzz(func(t *testing.T, data []byte, page uint16) {
		raw, sealed := fuzzPage(data, typeBitmap)
		words := new(bitPage)
		for _, p := range [][]byte{raw, sealed} {
			_ = decodeBitmap(p, 9, 0, int(page%4), 40000, words)
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	sm := newSpaceMap(100000)
	for i := range sm.pages {
		sm.pages[i] = ptr{uint64(10 + i), 2}
	}
	p := make([]byte, PageSize)
	sm.encodeIndex(p, 0, 9, 4)
	f.Add(p[:headerSize+16*len(sm.pages)], uint8(len(sm.pages)))
	f.Fuzz(func(t *testing.T, data []byte, want uint8) {
		raw, sealed := fuzzPage(data, typeIndex)
		for _, p := range [][]byte{raw, sealed} {
			_, _ = decodeIndex(p, 9, 0, int(want), 1000)
		}
	})
}
