package meta

// Space maps: one allocation bit per metadata page or data chunk,
// persisted copy-on-write as bitmap pages listed by index pages, which the
// superblock lists. In memory a map keeps a count of set bits per page,
// and the bits of its partly used pages up to a limit: past it, a page
// unchanged since a durable commit wrote it is paged out and read back on
// use (docs/metadata.md section 32).
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
	"fmt"
	"math/bits"
	"slices"
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
	held    []*heldPage
	nheldP  int    // pages with held bits
	heldMem uint64 // their memory
	used    uint64 // set bits in words
	nheld   uint64
	cursor  uint64 // next-fit start word

	pages      []ptr // bitmap pages; zero ptr: never written
	dirtyPage  []bool
	idx        []ptr // index pages
	dirtyIndex []bool

	// Paging. A page partly used (words of its own) whose bits are those
	// of its bitmap page on disk (not dirty, and written: by a durable
	// transaction, or by store) may be paged out: words[pi] nil, its bits
	// those of bitmap page pages[pi], which no commit frees before the page
	// changes again; setN[pi] still counts them. bitsOf reads it back. A
	// dirty page is written first (store), to a page of the open
	// transaction, as the node cache writes dirty nodes back.
	fetch   func(pi uint64, raw []byte, p *bitPage) error // nil: never paged out
	store   func(pi uint64, raw []byte) error             // nil: dirty pages stay
	limit   int                                           // pages with words of their own kept (0: no limit)
	durable uint64                                        // the last durable transaction
	wrote   []bool                                        // written by store since last dirtied
	changes []uint32                                      // times dirtied: ReadMapAhead's check that a page it read is still the page
	ref     []bool                                        // used since the clock hand passed
	hand    int
	stuck   bool     // the last sweeps found nothing to page out: none till durable moves
	spare   *bitPage // a paged-out page's block, for the next read
	raw     []byte   // bitsOf's read buffer
	out     int      // pages paged out
	reads   uint64   // pages read back
	writes  uint64   // dirty pages written by store
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

// heldPage is the held bits of one bitmap page's range: sparse, the words
// that have some (frees at random hold one bit in a word here and there),
// until they are more than heldSparse, then a block of all the page's
// words.
type heldPage struct {
	w    *[wordsPerPage]uint64 // nil while sparse
	idx  []uint16              // sparse: the words with held bits, in order
	bits []uint64              // and those bits
	n    uint32                // bits set
}

// heldSparse is the most words a held page keeps sparse (10 bytes each).
const heldSparse = 256

// cost is the memory of h.
func (h *heldPage) cost() uint64 {
	c := uint64(64) // the struct and its pointer
	if h.w != nil {
		c += uint64(len(h.w)) * 8
	}
	return c + uint64(cap(h.idx))*2 + uint64(cap(h.bits))*8
}

// word is word j of the page's held bits.
func (h *heldPage) word(j uint16) uint64 {
	if h.w != nil {
		return h.w[j]
	}
	if k, ok := slices.BinarySearch(h.idx, j); ok {
		return h.bits[k]
	}
	return 0
}

// set sets mask in word j.
func (h *heldPage) set(j uint16, mask uint64) {
	if h.w != nil {
		h.n += uint32(bits.OnesCount64(mask &^ h.w[j]))
		h.w[j] |= mask
		return
	}
	k, ok := slices.BinarySearch(h.idx, j)
	if ok {
		h.n += uint32(bits.OnesCount64(mask &^ h.bits[k]))
		h.bits[k] |= mask
		return
	}
	h.n += uint32(bits.OnesCount64(mask))
	h.idx, h.bits = slices.Insert(h.idx, k, j), slices.Insert(h.bits, k, mask)
	if len(h.idx) > heldSparse {
		h.w = new([wordsPerPage]uint64)
		for k, j := range h.idx {
			h.w[j] = h.bits[k]
		}
		h.idx, h.bits = nil, nil
	}
}

// clear clears mask in word j.
func (h *heldPage) clear(j uint16, mask uint64) {
	if h.w != nil {
		h.n -= uint32(bits.OnesCount64(mask & h.w[j]))
		h.w[j] &^= mask
		return
	}
	if k, ok := slices.BinarySearch(h.idx, j); ok {
		h.n -= uint32(bits.OnesCount64(mask & h.bits[k]))
		if h.bits[k] &^= mask; h.bits[k] == 0 {
			h.idx, h.bits = slices.Delete(h.idx, k, k+1), slices.Delete(h.bits, k, k+1)
		}
	}
}

func pagesFor(nbits uint64) int { return int((nbits + bitsPerPage - 1) / bitsPerPage) }

func idxFor(npages int) int { return (npages + idxPerPage - 1) / idxPerPage }

func newSpaceMap(nbits uint64) *spaceMap {
	s := &spaceMap{}
	_ = s.grow(nbits) // an empty map has no page to read back: no error
	return s
}

// grow extends the map to nbits; new bits are free and their pages dirty.
// The old last page gains bits, so it is read back if paged out.
func (s *spaceMap) grow(nbits uint64) error {
	np := pagesFor(nbits)
	if n := len(s.words); n > 0 && np > 0 {
		if _, err := s.bitsOf(uint64(n - 1)); err != nil {
			return err
		}
	}
	for len(s.words) < np {
		s.words = append(s.words, emptyBits)
		s.setN = append(s.setN, 0)
		s.ref = append(s.ref, false)
		s.wrote = append(s.wrote, false)
		s.changes = append(s.changes, 0)
	}
	s.held = append(s.held, make([]*heldPage, np-len(s.held))...)
	for len(s.pages) < np {
		s.pages = append(s.pages, ptr{})
		s.dirtyPage = append(s.dirtyPage, true)
	}
	if np > 0 {
		s.dirty(uint64(len(s.dirtyPage) - 1)) // the old last page gained bits
	}
	for len(s.idx) < idxFor(np) {
		s.idx = append(s.idx, ptr{})
		s.dirtyIndex = append(s.dirtyIndex, true)
	}
	s.nbits = nbits
	return nil
}

// bitsOf returns page pi's bits, reading them back if the page is paged
// out (which may page out others).
func (s *spaceMap) bitsOf(pi uint64) (*bitPage, error) {
	if p := s.words[pi]; p != nil {
		s.ref[pi] = true
		return p, nil
	}
	p := s.spare
	if p == nil {
		p = new(bitPage)
	}
	s.spare = nil
	if s.raw == nil {
		s.raw = make([]byte, PageSize)
	}
	if err := s.readBack(pi, s.raw, p); err != nil {
		s.spare = p
		return nil, err
	}
	s.install(pi, p)
	return p, nil
}

// install makes p, read back, paged-out page pi's bits, unless its count
// is not the page's (then it is left paged out, for bitsOf to report).
func (s *spaceMap) install(pi uint64, p *bitPage) {
	n := 0
	for _, w := range p {
		n += bits.OnesCount64(w)
	}
	if uint32(n) != s.setN[pi] {
		return
	}
	s.words[pi], s.ref[pi] = p, true
	s.owned++
	s.out--
	s.reads++
	s.trim(int(pi))
}

// readBack reads paged-out page pi's bits into p through raw, and checks
// that they are as many as the page counts.
func (s *spaceMap) readBack(pi uint64, raw []byte, p *bitPage) error {
	if s.fetch == nil {
		return fmt.Errorf("meta: space map page %d is paged out with no way to read it: %w", pi, ErrCorrupt)
	}
	if err := s.fetch(pi, raw, p); err != nil {
		return err
	}
	n := 0
	for _, w := range p {
		n += bits.OnesCount64(w)
	}
	if uint32(n) != s.setN[pi] {
		return corrupt(s.pages[pi].loc, "bitmap page %d read back with %d bits set, %d when paged out", pi, n, s.setN[pi])
	}
	return nil
}

// peek is bitsOf for a reader holding Meta.mu shared: a paged-out page is
// read into buf (through raw) and left paged out.
func (s *spaceMap) peek(pi uint64, raw []byte, buf *bitPage) (*bitPage, error) {
	if p := s.words[pi]; p != nil {
		return p, nil
	}
	if err := s.readBack(pi, raw, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// dirty marks page pi changed in the open transaction: its bits on disk
// are old.
func (s *spaceMap) dirty(pi uint64) {
	s.dirtyPage[pi], s.wrote[pi] = true, false
	s.changes[pi]++
}

// trim pages out pages, clock order, while more than limit have words of
// their own, never page keep (-1: none). A sweep (twice round, for the
// second chances) pages out clean pages; if the map is still over its
// limit, a second writes dirty ones (store) and pages them out. If that
// leaves the map over its limit (the pages left were just used, or their
// commit's writes are in flight, or a write failed), trim does nothing
// more until setDurable.
func (s *spaceMap) trim(keep int) {
	if s.limit <= 0 || s.stuck || s.owned <= s.limit {
		return
	}
	n := len(s.words)
	for pass := 0; pass < 2 && s.owned > s.limit; pass++ {
		if pass == 1 && s.store == nil {
			break
		}
		for steps := 0; s.owned > s.limit && steps < 2*n; steps++ {
			h := s.hand
			if s.hand++; s.hand == n {
				s.hand = 0
			}
			p := s.words[h]
			if p == nil || p == emptyBits || p == fullBits || h == keep {
				continue
			}
			if pass == 0 && (s.dirtyPage[h] || !s.wrote[h] && (s.pages[h].tx == 0 || s.pages[h].tx > s.durable)) {
				continue // not on disk as it is
			}
			if pass == 1 && !s.dirtyPage[h] {
				continue // clean but not written yet: its commit's writes are in flight
			}
			if s.ref[h] {
				s.ref[h] = false
				continue
			}
			if pass == 1 {
				if s.raw == nil {
					s.raw = make([]byte, PageSize)
				}
				if err := s.store(uint64(h), s.raw); err != nil {
					break // no room or a failed write: it stays dirty, for the commit
				}
				s.dirtyPage[h], s.wrote[h] = false, true
				s.writes++
			}
			s.words[h], s.spare = nil, p
			s.owned--
			s.out++
		}
	}
	s.stuck = s.owned > s.limit
}

// setDurable records that transaction tx is durable: pages it wrote may
// be paged out now.
func (s *spaceMap) setDurable(tx uint64) {
	s.durable, s.stuck = tx, false
	s.trim(-1)
}

// isSet reports whether bit i is set.
func (s *spaceMap) isSet(i uint64) (bool, error) {
	p, err := s.bitsOf(i / bitsPerPage)
	if err != nil {
		return false, err
	}
	return p[(i/64)%wordsPerPage]&(1<<(i%64)) != 0, nil
}

// pageBits is how many bits of the map page pi covers.
func (s *spaceMap) pageBits(pi uint64) uint64 { return min(bitsPerPage, s.nbits-pi*bitsPerPage) }

// own returns page pi's words to change, copying a shared page first. The
// page is not paged out (bitsOf).
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
	return uint64(s.owned)*uint64(len(bitPage{}))*8 + s.heldMem
}

// set sets bit i (and dirties its page, changed or not).
func (s *spaceMap) set(i uint64) error {
	pi := i / bitsPerPage
	p, err := s.bitsOf(pi)
	if err != nil {
		return err
	}
	if p[(i/64)%wordsPerPage]&(1<<(i%64)) == 0 { // a shared page is copied only for a change
		s.own(pi)[(i/64)%wordsPerPage] |= 1 << (i % 64)
		s.setN[pi]++
		s.used++
		s.settle(pi)
	}
	s.dirty(pi)
	s.trim(int(pi)) // own may have copied a shared page
	return nil
}

// clear clears bit i (and dirties its page, changed or not).
func (s *spaceMap) clear(i uint64) error {
	pi := i / bitsPerPage
	p, err := s.bitsOf(pi)
	if err != nil {
		return err
	}
	if p[(i/64)%wordsPerPage]&(1<<(i%64)) != 0 {
		s.own(pi)[(i/64)%wordsPerPage] &^= 1 << (i % 64)
		s.setN[pi]--
		s.used--
		s.settle(pi)
	}
	s.dirty(pi)
	s.trim(int(pi)) // own may have copied a shared page
	return nil
}

// mustBeSet returns ErrInvalid unless bit i is in the map and set (the
// data chunk op, such as "free", is in use); then its page is in memory.
func (s *spaceMap) mustBeSet(i uint64, op string) error {
	if i >= s.nbits {
		return fmt.Errorf("meta: %s of data chunk %d, past the map's %d: %w", op, i, s.nbits, ErrInvalid)
	}
	set, err := s.isSet(i)
	if err != nil {
		return err
	}
	if !set {
		return fmt.Errorf("meta: %s of data chunk %d, not in use: %w", op, i, ErrInvalid)
	}
	return nil
}

// pageFull reports whether page pi has no bit that is neither set nor
// held (a held bit is never set: it was cleared when freed, or is a
// grow's new bit).
func (s *spaceMap) pageFull(pi uint64) bool {
	n := uint64(s.setN[pi])
	if h := s.held[pi]; h != nil {
		n += uint64(h.n)
	}
	return n >= s.pageBits(pi)
}

// free is the number of bits that can be allocated now.
func (s *spaceMap) free() uint64 { return s.nbits - s.used - s.nheld }

// alloc finds and sets a bit that is neither set nor held, next-fit from
// the cursor's word. Pages with no such bit are skipped by their counts,
// without reading them back.
func (s *spaceMap) alloc() (uint64, bool, error) {
	nw := (s.nbits + 63) / 64
	if nw == 0 || s.free() == 0 {
		return 0, false, nil
	}
	np := uint64(len(s.words))
	s.cursor %= nw
	sp := s.cursor / wordsPerPage
	// The cursor's page from the cursor, every other page, then the
	// cursor's page again up to the cursor.
	for k := uint64(0); k <= np; k++ {
		pi := (sp + k) % np
		if s.pageFull(pi) {
			continue
		}
		lo, hi := pi*wordsPerPage, min((pi+1)*wordsPerPage, nw)
		if k == 0 {
			lo = s.cursor
		} else if k == np {
			hi = s.cursor
		}
		if lo >= hi {
			continue
		}
		p, err := s.bitsOf(pi)
		if err != nil {
			return 0, false, err
		}
		for w := lo; w < hi; w++ {
			busy := p[w%wordsPerPage] | s.heldWord(w)
			if w == nw-1 && s.nbits%64 != 0 {
				busy |= ^uint64(0) << (s.nbits % 64)
			}
			if busy == ^uint64(0) {
				continue
			}
			i := w*64 + uint64(bits.TrailingZeros64(^busy))
			s.cursor = w
			if err := s.set(i); err != nil {
				return 0, false, err
			}
			return i, true, nil
		}
	}
	return 0, false, nil
}

// heldWord is word w of the held bits.
func (s *spaceMap) heldWord(w uint64) uint64 {
	if p := s.held[w/wordsPerPage]; p != nil {
		return p.word(uint16(w % wordsPerPage))
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
	} else {
		s.heldMem -= p.cost()
	}
	p.set(uint16(w%wordsPerPage), mask)
	s.heldMem += p.cost()
}

// unholdWord clears the bits of mask in held word w, dropping its page
// when it holds no more.
func (s *spaceMap) unholdWord(w, mask uint64) {
	p := s.held[w/wordsPerPage]
	if p == nil {
		return
	}
	s.heldMem -= p.cost()
	p.clear(uint16(w%wordsPerPage), mask)
	if p.n == 0 {
		s.held[w/wordsPerPage] = nil
		s.nheldP--
		return
	}
	s.heldMem += p.cost()
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

// encodeBitmap encodes page i, which is dirty, so not paged out.
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
// and counts them. The page is durable (Open): it may be paged out at
// once to keep the map within its limit.
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
	s.trim(i)
}
