package archive

// Blocks are stored in packs: a pack object, key "packs/HH/ID" (ID 32 random
// hex digits, HH its first two), is the concatenation of block objects, each
// in the object envelope of object.go and sealed under the block's own name
// ("blocks/HH/HASH", which no object carries), so a block can be moved to
// another pack byte for byte. Its index object, key "index/ID", written
// after the pack (so an index always has its pack), lists the pack's
// blocks. Index plaintext, inside an object envelope:
//
//	offset  size    meaning
//	0       8       magic "BSARIDX1"
//	8       4       number of entries N
//	12      4       reserved, zero
//	16      40xN    per block: hash (32), offset in the pack (4), length (4)
//	...     32      SHA-256 of everything before it
//
// A reader fetches one block with a ranged GET of [offset, offset+length).

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"
)

const (
	idxMagic  = "BSARIDX1"
	idxEntry  = 40
	idxFixed  = 16
	idPrefix  = "index/"
	packDir   = "packs/"
	packIDLen = 32
	// DefaultPackSize is the size a pack is uploaded at.
	DefaultPackSize = 8 << 20
)

type idxEntryT struct {
	h      Hash
	off, n uint32
}

type loc struct {
	pack   string
	off, n uint32
}

func packKey(id string) string  { return packDir + id[:2] + "/" + id }
func indexKey(id string) string { return idPrefix + id }

func validPackID(id string) bool {
	if len(id) != packIDLen {
		return false
	}
	for _, c := range []byte(id) {
		if _, ok := unhex(c); !ok {
			return false
		}
	}
	return true
}

func encodeIndex(es []idxEntryT) []byte {
	b := make([]byte, idxFixed, idxFixed+idxEntry*len(es)+32)
	copy(b, idxMagic)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(es)))
	for _, e := range es {
		b = append(b, e.h[:]...)
		b = binary.LittleEndian.AppendUint32(b, e.off)
		b = binary.LittleEndian.AppendUint32(b, e.n)
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

func decodeIndex(b []byte) ([]idxEntryT, error) {
	if len(b) < idxFixed+32 || string(b[:8]) != idxMagic || binary.LittleEndian.Uint32(b[12:]) != 0 {
		return nil, fmt.Errorf("archive: index: bad header: %w", ErrCorrupt)
	}
	body := b[:len(b)-32]
	if sum := sha256.Sum256(body); string(sum[:]) != string(b[len(body):]) {
		return nil, fmt.Errorf("archive: index: checksum mismatch: %w", ErrCorrupt)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if uint64(len(body)-idxFixed) != uint64(n)*idxEntry {
		return nil, fmt.Errorf("archive: index: %d bytes for %d entries: %w", len(body)-idxFixed, n, ErrCorrupt)
	}
	es := make([]idxEntryT, n)
	p := body[idxFixed:]
	for i := range es {
		copy(es[i].h[:], p)
		es[i].off = binary.LittleEndian.Uint32(p[32:])
		es[i].n = binary.LittleEndian.Uint32(p[36:])
		if es[i].h.IsZero() || uint64(es[i].off)+uint64(es[i].n) > 1<<32-1 || es[i].n < objHeader {
			return nil, fmt.Errorf("archive: index: entry %d: %w", i, ErrCorrupt)
		}
		p = p[idxEntry:]
	}
	return es, nil
}

// index is the repository's block index in memory: where each block is.
type index struct {
	// mu guards perPack and blocks. Taken alone; never held across I/O.
	mu      sync.RWMutex
	perPack map[string][]idxEntryT
	blocks  map[Hash]loc
}

func (x *index) lookup(h Hash) (loc, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blocks[h]
	return l, ok
}

// add records a pack's entries; a block already indexed elsewhere keeps
// its first location.
func (x *index) add(id string, es []idxEntryT) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.perPack[id] = es
	for _, e := range es {
		if _, ok := x.blocks[e.h]; !ok {
			x.blocks[e.h] = loc{pack: id, off: e.off, n: e.n}
		}
	}
}

// remove forgets a pack (after GC deleted or rewrote it).
func (x *index) remove(id string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.perPack, id)
	x.rebuild()
}

func (x *index) rebuild() {
	x.blocks = make(map[Hash]loc)
	for id, es := range x.perPack {
		for _, e := range es {
			if l, ok := x.blocks[e.h]; !ok || id < l.pack { // a stable choice
				x.blocks[e.h] = loc{pack: id, off: e.off, n: e.n}
			}
		}
	}
}

// known returns a copy of the set of indexed blocks.
func (x *index) known() map[Hash]struct{} {
	x.mu.RLock()
	defer x.mu.RUnlock()
	k := make(map[Hash]struct{}, len(x.blocks))
	for h := range x.blocks {
		k[h] = struct{}{}
	}
	return k
}

// refreshIndex brings the in-memory index up to date with the index
// objects in the repository: new ones are read (in parallel), vanished
// ones forgotten.
func (r *Repo) refreshIndex(ctx context.Context) error {
	// Only packs known before the listing can be judged vanished: one this
	// process writes meanwhile may be missing from the listing.
	r.idx.mu.RLock()
	before := make([]string, 0, len(r.idx.perPack))
	for id := range r.idx.perPack {
		before = append(before, id)
	}
	r.idx.mu.RUnlock()
	present := make(map[string]bool)
	for o, err := range r.be.List(ctx, idPrefix) {
		if err != nil {
			return err
		}
		id := strings.TrimPrefix(o.Key, idPrefix)
		if validPackID(id) {
			present[id] = true
		}
	}
	r.idx.mu.RLock()
	var missing []string
	for id := range present {
		if _, ok := r.idx.perPack[id]; !ok {
			missing = append(missing, id)
		}
	}
	r.idx.mu.RUnlock()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, id := range missing {
		g.Go(func() error {
			es, err := r.readIndex(gctx, id)
			if err != nil {
				return err
			}
			r.idx.add(id, es)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, id := range before {
		if !present[id] {
			r.idx.remove(id)
		}
	}
	return nil
}

func (r *Repo) readIndex(ctx context.Context, id string) ([]idxEntryT, error) {
	key := indexKey(id)
	obj, err := r.be.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	plain, err := r.codec.open(key, obj, nil)
	if err != nil {
		return nil, err
	}
	es, err := decodeIndex(plain)
	if err != nil {
		return nil, fmt.Errorf("archive: %s: %w", key, err)
	}
	return es, nil
}

// writePack uploads a pack and then its index, and records it.
func (r *Repo) writePack(ctx context.Context, data []byte, es []idxEntryT) error {
	id := randomHex(packIDLen / 2)
	if err := r.be.Put(ctx, packKey(id), data); err != nil {
		return err
	}
	key := indexKey(id)
	bp := r.codec.seal(key, encodeIndex(es))
	err := r.be.Put(ctx, key, *bp)
	r.codec.bufs.Put(bp)
	if err != nil {
		return err
	}
	r.idx.add(id, es)
	return nil
}

// packer gathers sealed blocks into packs of about size bytes; the worker
// whose block fills a pack uploads it, while the others fill the next.
type packer struct {
	r    *Repo
	size int
	// mu guards buf and es.
	mu  sync.Mutex
	buf []byte
	es  []idxEntryT
}

func (p *packer) add(ctx context.Context, h Hash, sealed []byte) error {
	p.mu.Lock()
	p.es = append(p.es, idxEntryT{h: h, off: uint32(len(p.buf)), n: uint32(len(sealed))})
	p.buf = append(p.buf, sealed...)
	if len(p.buf) < p.size {
		p.mu.Unlock()
		return nil
	}
	buf, es := p.buf, p.es
	p.buf, p.es = make([]byte, 0, p.size+p.size/8), nil
	p.mu.Unlock()
	return p.r.writePack(ctx, buf, es)
}

func (p *packer) flush(ctx context.Context) error {
	p.mu.Lock()
	buf, es := p.buf, p.es
	p.buf, p.es = nil, nil
	p.mu.Unlock()
	if len(es) == 0 {
		return nil
	}
	return p.r.writePack(ctx, buf, es)
}
