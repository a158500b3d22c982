package meta

// Space maps: one allocation bit per metadata page or data chunk, held
// whole in memory and persisted copy-on-write as bitmap pages listed by
// index pages, which the superblock lists.
//
// Bitmap page (typeBitmap), count = 0, level = 0:
//
//	offset size  field
//	32     4064  bits [i*bitsPerPage, (i+1)*bitsPerPage) of the map, as
//	             little-endian 64-bit words, least significant bit first;
//	             bits past the map's size are zero
//
// Index page (typeIndex), count = entries (at most idxPerPage), level = 0:
//
//	offset     size field
//	32+16j     8    bitmap page number
//	32+16j+8   8    bitmap page's transaction id

import (
	"encoding/binary"
	"math/bits"
)

const (
	wordsPerPage = (PageSize - headerSize) / 8
	bitsPerPage  = wordsPerPage * 64
	idxPerPage   = (PageSize - headerSize) / 16
)

// spaceMap is one bitmap. Guarded by Meta.mu.
type spaceMap struct {
	nbits uint64
	// words are the allocation bits, what the current transaction sees, by
	// bitmap page. A page whose bits are all clear is emptyBits, and one
	// whole within the map whose bits are all set is fullBits: shared,
	// never written (own copies one before a change). So a map costs
	// memory for the pages that are partly used only: a store's data
	// chunks are taken in order (next-fit), and most pages are full or
	// empty.
	words []*bitPage
	setN  []uint32 // bits set, by page
	owned int      // pages with words of their own
	// held are the bits freed but not reusable yet (docs/metadata.md
	// section 4), by bitmap page: nil where a page has none. Held bits are
	// few but for a while (the frees of the last transactions, a grow's new
	// range), so a page's words exist only while it has some: the map costs
	// one bit per chunk, not two.
	held   []*heldPage
	nheldP int    // pages with held bits
	used   uint64 // set bits in words
	nheld  uint64
	cursor uint64 // next-fit start word

	pages      []ptr // bitmap pages; zero ptr: never written
	dirtyPage  []bool
	idx        []ptr // index pages
	dirtyIndex []bool
}

// bitPage is the bits of one bitmap page.
type bitPage [wordsPerPage]uint64

// emptyBits and fullBits stand for a page with every bit clear and one
// with every bit set. Never written.
var emptyBits, fullBits = new(bitPage), func() *bitPage {
	p := new(bitPage)
	for i := range p {
		p[i] = ^uint64(0)
	}
	return p
}()

// heldPage is the held bits of one bitmap page's range.
type heldPage struct {
	w [wordsPerPage]uint64
	n uint32 // bits set in w
}

func pagesFor(nbits uint64) int { return int((nbits + bitsPerPage - 1) / bitsPerPage) }

func idxFor(npages int) int { return (npages + idxPerPage - 1) / idxPerPage }

func newSpaceMap(nbits uint64) *spaceMap {
	s := &spaceMap{}
	s.grow(nbits)
	return s
}

// grow extends the map to nbits; new bits are free and their pages dirty.
func (s *spaceMap) grow(nbits uint64) {
	np := pagesFor(nbits)
	for len(s.words) < np {
		s.words = append(s.words, emptyBits)
		s.setN = append(s.setN, 0)
	}
	s.held = append(s.held, make([]*heldPage, np-len(s.held))...)
	for len(s.pages) < np {
		s.pages = append(s.pages, ptr{})
		s.dirtyPage = append(s.dirtyPage, true)
	}
	if np > 0 {
		s.dirtyPage[len(s.dirtyPage)-1] = true // the old last page gained bits
	}
	for len(s.idx) < idxFor(np) {
		s.idx = append(s.idx, ptr{})
		s.dirtyIndex = append(s.dirtyIndex, true)
	}
	s.nbits = nbits
}

// word is word w of the allocation bits.
func (s *spaceMap) word(w uint64) uint64 { return s.words[w/wordsPerPage][w%wordsPerPage] }

func (s *spaceMap) isSet(i uint64) bool { return s.word(i/64)&(1<<(i%64)) != 0 }

func (s *spaceMap) touch(i uint64) { s.dirtyPage[i/bitsPerPage] = true }

// pageBits is how many bits of the map page pi covers.
func (s *spaceMap) pageBits(pi uint64) uint64 { return min(bitsPerPage, s.nbits-pi*bitsPerPage) }

// own returns page pi's words to change, copying a shared page first.
func (s *spaceMap) own(pi uint64) *bitPage {
	p := s.words[pi]
	if p == emptyBits || p == fullBits {
		c := *p
		p = &c
		s.words[pi] = p
		s.owned++
	}
	return p
}

// settle shares page pi's words again when they are all clear or all
// set.
func (s *spaceMap) settle(pi uint64) {
	shared := s.words[pi] == emptyBits || s.words[pi] == fullBits
	switch n := uint64(s.setN[pi]); {
	case n == 0:
		s.words[pi] = emptyBits
	case n == bitsPerPage && s.pageBits(pi) == bitsPerPage:
		s.words[pi] = fullBits
	default:
		return
	}
	if !shared {
		s.owned--
	}
}

// memBytes is the memory the map's bit blocks take (not counting the
// slices that point to them: 12 bytes per page).
func (s *spaceMap) memBytes() uint64 {
	return uint64(s.owned)*uint64(len(bitPage{}))*8 + uint64(s.nheldP)*uint64(len(heldPage{}.w))*8
}

func (s *spaceMap) set(i uint64) {
	if !s.isSet(i) { // a shared page is copied only for a change
		pi := i / bitsPerPage
		s.own(pi)[(i/64)%wordsPerPage] |= 1 << (i % 64)
		s.setN[pi]++
		s.used++
		s.settle(pi)
	}
	s.touch(i)
}

func (s *spaceMap) clear(i uint64) {
	if s.isSet(i) {
		pi := i / bitsPerPage
		s.own(pi)[(i/64)%wordsPerPage] &^= 1 << (i % 64)
		s.setN[pi]--
		s.used--
		s.settle(pi)
	}
	s.touch(i)
}

// free is the number of bits that can be allocated now.
func (s *spaceMap) free() uint64 { return s.nbits - s.used - s.nheld }

// alloc finds and sets a bit that is neither set nor held, next-fit.
func (s *spaceMap) alloc() (uint64, bool) {
	nw := uint64((s.nbits + 63) / 64)
	if nw == 0 || s.free() == 0 {
		return 0, false
	}
	for k := uint64(0); k <= nw; k++ {
		w := (s.cursor + k) % nw
		if pi := w / wordsPerPage; s.words[pi] == fullBits {
			// A full page: on to the next page's first word.
			k += wordsPerPage - 1 - w%wordsPerPage
			continue
		}
		busy := s.word(w) | s.heldWord(w)
		if w == nw-1 && s.nbits%64 != 0 {
			busy |= ^uint64(0) << (s.nbits % 64)
		}
		if busy == ^uint64(0) {
			continue
		}
		i := w*64 + uint64(bits.TrailingZeros64(^busy))
		s.cursor = w
		s.set(i)
		return i, true
	}
	return 0, false
}

// heldWord is word w of the held bits.
func (s *spaceMap) heldWord(w uint64) uint64 {
	if p := s.held[w/wordsPerPage]; p != nil {
		return p.w[w%wordsPerPage]
	}
	return 0
}

// isHeld reports whether bit i is held.
func (s *spaceMap) isHeld(i uint64) bool { return s.heldWord(i/64)&(1<<(i%64)) != 0 }

// holdWord sets the bits of mask in held word w, making its page if need
// be.
func (s *spaceMap) holdWord(w, mask uint64) {
	p := s.held[w/wordsPerPage]
	if p == nil {
		p = new(heldPage)
		s.held[w/wordsPerPage] = p
		s.nheldP++
	}
	x := &p.w[w%wordsPerPage]
	p.n += uint32(bits.OnesCount64(mask &^ *x))
	*x |= mask
}

// unholdWord clears the bits of mask in held word w, dropping its page
// when it holds no more.
func (s *spaceMap) unholdWord(w, mask uint64) {
	p := s.held[w/wordsPerPage]
	if p == nil {
		return
	}
	x := &p.w[w%wordsPerPage]
	p.n -= uint32(bits.OnesCount64(mask & *x))
	*x &^= mask
	if p.n == 0 {
		s.held[w/wordsPerPage] = nil
		s.nheldP--
	}
}

// hold marks i as freed but not yet reusable.
func (s *spaceMap) hold(i uint64) {
	s.holdWord(i/64, 1<<(i%64))
	s.nheld++
}

func (s *spaceMap) unhold(i uint64) {
	s.unholdWord(i/64, 1<<(i%64))
	s.nheld--
}

// holdRun holds [from, to), bits none of which is set or held (a grow's
// new bits), a word at a time: a grow may add millions.
func (s *spaceMap) holdRun(from, to uint64) {
	for i := from; i < to; {
		w, b := i/64, i%64
		n := min(64-b, to-i)
		s.holdWord(w, (^uint64(0)>>(64-n))<<b)
		i += n
	}
	s.nheld += to - from
}

// unholdRun releases what holdRun held.
func (s *spaceMap) unholdRun(from, to uint64) {
	for i := from; i < to; {
		w, b := i/64, i%64
		n := min(64-b, to-i)
		s.unholdWord(w, (^uint64(0)>>(64-n))<<b)
		i += n
	}
	s.nheld -= to - from
}

func (s *spaceMap) encodeBitmap(p []byte, i int, loc, tx uint64) {
	for j, v := range s.words[i] {
		binary.LittleEndian.PutUint64(p[headerSize+8*j:], v)
	}
	seal(p, header{typ: typeBitmap, loc: loc, tx: tx})
}

// decodeBitmap validates bitmap page i of a map of nbits read from loc and
// copies its bits into words.
func decodeBitmap(p []byte, loc, tx uint64, i int, nbits uint64, words *bitPage) error {
	h, err := openPage(p, loc, typeBitmap, tx)
	if err != nil {
		return err
	}
	if h.count != 0 || h.level != 0 {
		return corrupt(loc, "bitmap header count %d level %d", h.count, h.level)
	}
	base := uint64(i) * bitsPerPage
	for j := range wordsPerPage {
		v := binary.LittleEndian.Uint64(p[headerSize+8*j:])
		first := base + uint64(j)*64
		if first >= nbits && v != 0 || first < nbits && nbits-first < 64 && v>>(nbits-first) != 0 {
			return corrupt(loc, "bits set past the map's end")
		}
		words[j] = v
	}
	return nil
}

func (s *spaceMap) encodeIndex(p []byte, j int, loc, tx uint64) {
	clear(p[headerSize:])
	ents := s.pages[j*idxPerPage : min(len(s.pages), (j+1)*idxPerPage)]
	for k, e := range ents {
		binary.LittleEndian.PutUint64(p[headerSize+16*k:], e.loc)
		binary.LittleEndian.PutUint64(p[headerSize+16*k+8:], e.tx)
	}
	seal(p, header{typ: typeIndex, loc: loc, tx: tx, count: uint16(len(ents))})
}

// decodeIndex validates an index page read from loc that must list want
// bitmap pages, none written after tx, and returns them.
func decodeIndex(p []byte, loc, tx uint64, want int, pages uint64) ([]ptr, error) {
	h, err := openPage(p, loc, typeIndex, tx)
	if err != nil {
		return nil, err
	}
	if int(h.count) != want || want > idxPerPage || h.level != 0 {
		return nil, corrupt(loc, "index lists %d pages, want %d", h.count, want)
	}
	out := make([]ptr, want)
	for k := range out {
		out[k] = ptr{loc: binary.LittleEndian.Uint64(p[headerSize+16*k:]), tx: binary.LittleEndian.Uint64(p[headerSize+16*k+8:])}
		if out[k].loc < 2 || out[k].loc >= pages || out[k].tx == 0 || out[k].tx > h.tx {
			return nil, corrupt(loc, "index entry %d (%d, %d)", k, out[k].loc, out[k].tx)
		}
	}
	for _, b := range p[headerSize+16*want:] {
		if b != 0 {
			return nil, corrupt(loc, "bytes after the last entry")
		}
	}
	return out, nil
}

// load sets page i's words to those decoded into p (which it may keep),
// and counts them.
func (s *spaceMap) load(i int, p *bitPage) {
	n := uint64(0)
	for _, w := range p {
		n += uint64(bits.OnesCount64(w))
	}
	s.used += n - uint64(s.setN[i])
	if s.words[i] == emptyBits || s.words[i] == fullBits {
		s.owned++
	}
	s.words[i], s.setN[i] = p, uint32(n)
	s.settle(uint64(i))
}
