package meta

import (
	"errors"
	"fmt"
)

// maxProblems bounds the problems Check collects before it stops.
const maxProblems = 20

// checker collects problems found by Check.
type checker struct {
	v        *View
	problems []error
	pages    []uint64 // reachable metadata pages, as bits
	chunks   []uint64 // referenced data chunks, as bits
	keys     [2]uint64
	sums     [2]uint64
	runs     [2]uint64
}

func (c *checker) addf(format string, args ...any) {
	if len(c.problems) < maxProblems {
		c.problems = append(c.problems, fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...)))
	}
}

func (c *checker) full() bool { return len(c.problems) >= maxProblems }

func markBit(bits []uint64, i uint64) bool {
	was := bits[i/64]&(1<<(i%64)) != 0
	bits[i/64] |= 1 << (i % 64)
	return was
}

func (c *checker) page(loc uint64, what string) {
	if loc >= c.v.st.pages {
		c.addf("%s page %d past the region's %d pages", what, loc, c.v.st.pages)
		return
	}
	if markBit(c.pages, loc) {
		c.addf("%s page %d is used twice", what, loc)
	}
}

// Check verifies the committed transaction the view reads: every page
// decodes and validates; key order, node fill and separators; runs that
// do not overlap; the two trees hold the same keys; the key and run counts;
// both space maps equal what the trees and maps reach (no leak, no double
// use). It writes nothing, so it runs on a read-only Meta. The error joins
// up to 20 problems, each wrapping ErrCorrupt; on a read-only Meta whose
// region a writer committed past its transaction meanwhile, it is a
// *ChangedError instead (changed.go).
func (v *View) Check() error {
	if v.released {
		return errReleased
	}
	st := v.st
	c := &checker{v: v, pages: make([]uint64, (st.pages+63)/64), chunks: make([]uint64, (st.dataChunks+63)/64)}
	c.page(0, "superblock")
	c.page(1, "superblock")
	for _, e := range st.ext { // the region's own data chunks
		for i := e.chunk; i < e.chunk+e.chunks && i < st.dataChunks; i++ {
			if markBit(c.chunks, i) {
				c.addf("data chunk %d in two extents", i)
			}
		}
	}
	for i, t := range []tree{st.chunk, st.epoch} {
		if !t.root.isNil() {
			c.walk(t, t.root, int(t.level), nil, nil, true)
		}
		if c.runs[i] != t.runs {
			c.addf("tree %d has %d runs, superblock says %d", i, c.runs[i], t.runs)
		}
	}
	if c.keys[chunkTree] != st.keys || c.keys[epochTree] != st.keys {
		c.addf("trees have %d and %d keys, superblock says %d", c.keys[chunkTree], c.keys[epochTree], st.keys)
	}
	if c.sums[chunkTree] != c.sums[epochTree] {
		c.addf("the chunk tree and the epoch tree hold different keys")
	}
	// Every page of both maps is reached before the metadata map is
	// compared (its bits cover them all); then each map is read and
	// compared a page at a time, so no copy of a whole map is held.
	metaMap := c.mapPages(st.metaIdx, st.metaPages, "metadata")
	dataMap := c.mapPages(st.dataIdx, st.dataPages, "data")
	c.compareMap(metaMap, st.pages, c.pages, "metadata page")
	c.compareMap(dataMap, st.dataChunks, c.chunks, "data chunk")
	if len(c.problems) > 0 {
		// On a read-only Meta beside a live writer, what the walk met
		// may be pages the writer reused since: not corruption.
		if ch := c.v.r.m.Changed(); ch != nil {
			return ch
		}
	}
	return errors.Join(c.problems...)
}

// Check runs View.Check on the last committed transaction.
func (m *Meta) Check() error {
	v := m.View()
	defer v.Release()
	return v.Check()
}

// walk checks the subtree at p whose keys must lie in [lo, hi) (nil: open).
func (c *checker) walk(t tree, p ptr, level int, lo, hi *run, root bool) {
	if c.full() {
		return
	}
	c.page(p.loc, "tree")
	n, err := c.v.r.m.load(p, t.kind, level)
	if err != nil {
		c.problems = append(c.problems, err)
		return
	}
	k := t.kind
	if len(n.runs) == 0 {
		c.addf("page %d: empty node", p.loc)
		return
	}
	if !root && underfull(n) {
		c.addf("page %d: node below a quarter full (%d runs, %d bytes)", p.loc, len(n.runs), n.size)
	}
	if n.leaf() {
		if n.size > leafCap || k.leafSize(n.runs) != n.size {
			c.addf("page %d: leaf size %d", p.loc, n.size)
		}
		for i, r := range n.runs {
			if lo != nil && k.cmp(r, *lo) < 0 || hi != nil && k.cmp(k.last(r), *hi) >= 0 {
				c.addf("page %d: run %v outside its separators", p.loc, r)
			}
			if i > 0 && k.cmp(k.last(n.runs[i-1]), r) >= 0 {
				c.addf("page %d: runs %d and %d overlap or are out of order", p.loc, i-1, i)
			}
			c.runs[k]++
			c.keys[k] += uint64(r.n)
			for j := uint64(0); j < uint64(r.n); j++ {
				c.sums[k] += keyHash(r.b, r.c+j, r.e)
			}
			if k == chunkTree {
				c.dataRefs(p.loc, r)
			}
		}
		return
	}
	for i := range n.kids {
		clo, chi := &n.runs[i], hi
		if i == 0 && lo != nil {
			if k.cmp(n.runs[0], *lo) < 0 {
				c.addf("page %d: first separator below the parent's", p.loc)
			}
		}
		if i > 0 && k.cmp(n.runs[i-1], n.runs[i]) >= 0 {
			c.addf("page %d: separators %d and %d out of order", p.loc, i-1, i)
		}
		if i+1 < len(n.kids) {
			chi = &n.runs[i+1]
		}
		c.walk(t, n.kids[i], level-1, clo, chi, false)
	}
}

func (c *checker) dataRefs(page uint64, r run) {
	if r.loc >= LocSpecial {
		return
	}
	if r.loc+uint64(r.n) > c.v.st.dataChunks {
		c.addf("page %d: run %v past the data space (%d chunks)", page, r, c.v.st.dataChunks)
		return
	}
	for i := uint64(0); i < uint64(r.n); i++ {
		if markBit(c.chunks, r.loc+i) {
			c.addf("data chunk %d referenced twice (run %v)", r.loc+i, r)
		}
	}
}

// keyHash mixes one key; Check sums it over both trees, whose key sets
// are equal when the counts and the sums agree (a corruption that keeps
// both is vanishingly unlikely).
func keyHash(b uint32, c uint64, e uint32) uint64 {
	x := c*0x9e3779b97f4a7c15 ^ uint64(b)<<32 ^ uint64(e)
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// mapPages reads a committed space map's index pages and returns its
// bitmap pages, all of them marked reached (as far as the index could be
// read).
func (c *checker) mapPages(idx []ptr, npages int, what string) []ptr {
	m := c.v.r.m
	p := make([]byte, PageSize)
	var pages []ptr
	for j, ip := range idx {
		c.page(ip.loc, what+" index")
		if err := m.readPage(p, ip.loc); err != nil {
			c.problems = append(c.problems, err)
			break
		}
		ents, err := decodeIndex(p, ip.loc, ip.tx, min(idxPerPage, npages-j*idxPerPage), c.v.st.pages)
		if err != nil {
			c.problems = append(c.problems, err)
			break
		}
		pages = append(pages, ents...)
	}
	for _, bp := range pages {
		c.page(bp.loc, what+" bitmap")
	}
	return pages
}

// compareMap reads a space map of nbits from its bitmap pages, one at a
// time, and reports the bits that differ from what the walk reached.
func (c *checker) compareMap(pages []ptr, nbits uint64, reached []uint64, what string) {
	m := c.v.r.m
	p := make([]byte, PageSize)
	bits := new(bitPage)
	for i, bp := range pages {
		if err := m.readPage(p, bp.loc); err != nil {
			c.problems = append(c.problems, err)
			return
		}
		if err := decodeBitmap(p, bp.loc, bp.tx, i, nbits, bits); err != nil {
			c.problems = append(c.problems, err)
			continue
		}
		lo := i * wordsPerPage
		if lo >= len(reached) {
			return
		}
		if c.compare(bits[:min(wordsPerPage, len(reached)-lo)], reached[lo:min(lo+wordsPerPage, len(reached))], uint64(lo), what) {
			return
		}
	}
}

// compare reports bits that differ between words of a space map and
// those of what is reached, the first being word base of the map; it
// reports whether the checker is full.
func (c *checker) compare(mapped, reached []uint64, base uint64, what string) bool {
	for w := range reached {
		if w >= len(mapped) {
			break
		}
		if d := mapped[w] ^ reached[w]; d != 0 {
			for b := uint64(0); b < 64; b++ {
				if d&(1<<b) == 0 {
					continue
				}
				i := (base+uint64(w))*64 + b
				if mapped[w]&(1<<b) != 0 {
					c.addf("%s %d is marked in use but nothing reaches it (leak)", what, i)
				} else {
					c.addf("%s %d is in use but marked free", what, i)
				}
				if c.full() {
					return true
				}
			}
		}
	}
	return false
}
