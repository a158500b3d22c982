package meta

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// flipPage is one page of a known type and how to validate it.
type flipPage struct {
	name   string
	loc    uint64
	decode func(p []byte) error
}

// samplePages builds metadata with two-level trees and returns one page of
// every type, with its validator.
func samplePages(t *testing.T) (*blockdev.Mem, *Meta, []flipPage) {
	dev, m := newMemMeta(t, 2048, 1<<16, 0)
	rng := rand.New(rand.NewPCG(7, 7))
	for range 6000 {
		k := Key{B: rng.Uint32N(2), C: rng.Uint64N(1 << 20), E: 1 + rng.Uint32N(50)}
		loc, err := m.AllocData()
		require.NoError(t, err)
		require.NoError(t, m.Put(k, loc))
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Check())
	require.Greater(t, m.chunk.level, uint16(0))
	require.Greater(t, m.epoch.level, uint16(0))
	var pages []flipPage
	for _, tr := range []tree{m.chunk, m.epoch} {
		root, err := m.load(tr.root, tr.kind, int(tr.level))
		require.NoError(t, err)
		kid := root.kids[0]
		for lv := int(tr.level) - 1; lv > 0; lv-- {
			n, err := m.load(kid, tr.kind, lv)
			require.NoError(t, err)
			kid = n.kids[0]
		}
		k, rp, lvl := tr.kind, tr.root, int(tr.level)
		pages = append(pages,
			flipPage{"branch", rp.loc, func(p []byte) error { _, err := decodeNode(p, rp.loc, k, rp.tx, lvl); return err }},
			flipPage{"leaf", kid.loc, func(p []byte) error { _, err := decodeNode(p, kid.loc, k, kid.tx, 0); return err }})
	}
	sm := m.metaSM
	bp, ip := sm.pages[0], sm.idx[0]
	pages = append(pages,
		flipPage{"bitmap", bp.loc, func(p []byte) error {
			return decodeBitmap(p, bp.loc, bp.tx, 0, sm.nbits, new(bitPage))
		}},
		flipPage{"index", ip.loc, func(p []byte) error {
			_, err := decodeIndex(p, ip.loc, ip.tx, len(sm.pages), sm.nbits)
			return err
		}},
		flipPage{"superblock", (m.tx - 1) % 2, func(p []byte) error { _, err := decodeSuper(p, (m.tx-1)%2); return err }})
	return dev, m, pages
}

// TestBitFlips flips every bit of one page of each type (both tree kinds'
// branch and leaf pages, a bitmap, an index page, the newest superblock)
// and requires each flip to be rejected with ErrCorrupt. A flipped newest
// superblock must leave Open on the older copy.
func TestBitFlips(t *testing.T) {
	dev, m, pages := samplePages(t)
	p := make([]byte, PageSize)
	for _, fp := range pages {
		_, err := dev.ReadAt(p, int64(fp.loc)*PageSize)
		require.NoError(t, err)
		require.NoError(t, fp.decode(p), "%s page %d must validate unflipped", fp.name, fp.loc)
		for bit := 0; bit < PageSize*8; bit++ {
			p[bit/8] ^= 1 << (bit % 8)
			err := fp.decode(p)
			p[bit/8] ^= 1 << (bit % 8)
			require.ErrorIs(t, err, ErrCorrupt, "%s page %d: flip of bit %d not detected", fp.name, fp.loc, bit)
		}
	}
	// Open falls back to the other superblock copy.
	newest := (m.tx - 1) % 2
	require.NoError(t, m.Close())
	for bit := 0; bit < PageSize*8; bit += 331 {
		img := dev.Clone()
		_, err := img.ReadAt(p, int64(newest)*PageSize)
		require.NoError(t, err)
		p[bit/8] ^= 1 << (bit % 8)
		_, err = img.WriteAt(p, int64(newest)*PageSize)
		require.NoError(t, err)
		m2, err := Open(img, Options{ReadOnly: true})
		require.NoError(t, err, "bit %d", bit)
		require.Less(t, m2.committed.tx, m.tx-1, "bit %d: the damaged copy was used", bit)
		require.NoError(t, m2.Close())
	}
}

// TestMisdirectedAndStale: a page written to the wrong place, or an older
// version of a page, is reported as corrupt with its location.
func TestMisdirectedAndStale(t *testing.T) {
	dev, m, pages := samplePages(t)
	leaf := pages[1]
	p := make([]byte, PageSize)
	_, err := dev.ReadAt(p, int64(leaf.loc)*PageSize)
	require.NoError(t, err)
	// the same bytes at another page number: misdirected
	q := pages[0]
	err = q.decode(p)
	require.ErrorIs(t, err, ErrCorrupt)
	// an older transaction's version of the page: stale
	n, err := decodeNode(p, leaf.loc, chunkTree, 0, 0)
	require.NoError(t, err)
	n.tx--
	n.encode(p)
	err = leaf.decode(p)
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, "stale")
	require.ErrorContains(t, err, "page")
	_ = m
}
