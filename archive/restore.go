package archive

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
)

// RestoreOptions configures Restore.
type RestoreOptions struct {
	// Parallel is the number of blocks fetched and written at once; 0
	// means 8.
	Parallel int
	// Resume reads each block's destination first and skips the block if
	// it already holds the right contents (its hash matches), so a
	// restore that was interrupted continues without downloading again
	// what it wrote. Zero blocks that already read as zeros are skipped.
	Resume bool
	// NoDiscard writes zero blocks with WriteZeroes (or zeros) instead of
	// Discard, for destinations where a discard is not known to read back
	// as zeros or should not deallocate.
	NoDiscard bool
	// Progress and ProgressInterval as in BackupOptions.
	Progress         func(Progress)
	ProgressInterval time.Duration
}

// Restore writes backup id onto dst, which must be at least as large as the
// backed-up volume and have a block size that divides the repository's.
// Zero blocks become discards (holes); every fetched block's hash is
// checked before it is written, and a bad one stops the restore with a
// *BlockError that names it. dst is flushed at the end.
func (r *Repo) Restore(ctx context.Context, id string, dst blockdev.Device, o RestoreOptions) (*Progress, error) {
	m, err := r.Manifest(ctx, id)
	if err != nil {
		return nil, err
	}
	if dst.Size() < m.Size || m.BlockSize%dst.BlockSize() != 0 {
		return nil, fmt.Errorf("archive: restore %s (%d bytes) onto a %d-byte device with %d-byte blocks: %w",
			id, m.Size, dst.Size(), dst.BlockSize(), ErrOptions)
	}
	if err := r.refreshIndex(ctx); err != nil {
		return nil, err
	}
	c := &counters{start: time.Now(), total: m.Size}
	stop := c.report(o.Progress, o.ProgressInterval)
	err = r.restore(ctx, m, dst, o, c)
	if err == nil {
		err = dst.Flush()
	}
	stop()
	if err != nil {
		return nil, fmt.Errorf("archive: restore %s: %w", id, err)
	}
	p := c.snapshot()
	return &p, nil
}

// restore works in two passes: the first handles zero blocks and (with
// Resume) blocks the destination already holds, and notes the rest; the
// second fetches the rest a pack at a time, with one ranged GET over the
// blocks it needs from that pack.
func (r *Repo) restore(ctx context.Context, m *Manifest, dst blockdev.Device, o RestoreOptions, c *counters) error {
	parallel := cmp.Or(max(o.Parallel, 0), 8)
	need := make([]bool, len(m.Blocks))
	err := forEach(ctx, len(m.Blocks), parallel, func() func(int) error {
		cur := make([]byte, m.BlockSize)
		hs := r.newHasher()
		return func(i int) error {
			off, n, h := int64(i)*int64(m.BlockSize), m.blockLen(i), m.Blocks[i]
			if o.Resume {
				if _, err := dst.ReadAt(cur[:n], off); err != nil {
					return fmt.Errorf("read destination at %d: %w", off, err)
				}
				if hs.sum(cur[:n]) == h {
					c.deduped.Add(1)
					c.done.Add(int64(n))
					c.blocks.Add(1)
					return nil
				}
			}
			if h.IsZero() {
				c.zero.Add(1)
				c.done.Add(int64(n))
				c.blocks.Add(1)
				return zeroRange(dst, off, int64(n), o.NoDiscard, cur)
			}
			need[i] = true // each worker writes only its own indices
			return nil
		}
	})
	if err != nil {
		return err
	}
	packs, err := r.groupByPack(m, need)
	if err != nil {
		return err
	}
	return forEach(ctx, len(packs), parallel, func() func(int) error {
		buf := make([]byte, 0, m.BlockSize)
		return func(k int) error { return r.restorePack(ctx, m, dst, packs[k], buf, c) }
	})
}

// packPart is what a restore needs from one pack: the blocks (by the
// manifest indices where each occurs) and the byte span covering them.
type packPart struct {
	pack     string
	from, to int64
	blocks   []packBlock
}

type packBlock struct {
	off, n  uint32
	indices []int
}

func (r *Repo) groupByPack(m *Manifest, need []bool) ([]*packPart, error) {
	byPack := make(map[string]*packPart)
	type at struct {
		p *packPart
		k int // index in p.blocks (not a pointer: the slice grows)
	}
	byHash := make(map[Hash]at)
	var parts []*packPart
	for i, ok := range need {
		if !ok {
			continue
		}
		h := m.Blocks[i]
		if a, ok := byHash[h]; ok {
			a.p.blocks[a.k].indices = append(a.p.blocks[a.k].indices, i)
			continue
		}
		l, found := r.idx.lookup(h)
		if !found {
			return nil, blockErr(m, i, fmt.Errorf("in no pack's index: %w", ErrNotFound))
		}
		p := byPack[l.pack]
		if p == nil {
			p = &packPart{pack: l.pack, from: int64(l.off), to: int64(l.off) + int64(l.n)}
			byPack[l.pack] = p
			parts = append(parts, p)
		}
		p.from, p.to = min(p.from, int64(l.off)), max(p.to, int64(l.off)+int64(l.n))
		p.blocks = append(p.blocks, packBlock{off: l.off, n: l.n, indices: []int{i}})
		byHash[h] = at{p, len(p.blocks) - 1}
	}
	return parts, nil
}

func (r *Repo) restorePack(ctx context.Context, m *Manifest, dst blockdev.Device, p *packPart, buf []byte, c *counters) error {
	span, err := r.be.GetRange(ctx, packKey(p.pack), p.from, p.to-p.from)
	if errors.Is(err, ErrNotFound) {
		return blockErr(m, p.blocks[0].indices[0], err)
	}
	if err != nil {
		return err
	}
	for _, b := range p.blocks {
		first := b.indices[0]
		lo, hi := int64(b.off)-p.from, int64(b.off)+int64(b.n)-p.from
		if hi > int64(len(span)) {
			return blockErr(m, first, fmt.Errorf("%s is shorter than its index says: %w", packKey(p.pack), ErrCorrupt))
		}
		plain, err := r.openBlock(m, first, span[lo:hi], buf)
		if err != nil {
			return err
		}
		c.stored.Add(int64(b.n))
		for _, i := range b.indices {
			off := int64(i) * int64(m.BlockSize)
			if _, err := dst.WriteAt(plain, off); err != nil {
				return fmt.Errorf("write block %d at %d: %w", i, off, err)
			}
			c.uploaded.Add(1)
			c.done.Add(int64(len(plain)))
			c.blocks.Add(1)
		}
	}
	return nil
}

// forEach runs fn(i) for i in [0, n) on parallel goroutines, each with its
// own fn from newWorker (for per-goroutine buffers), stopping at the first
// error.
func forEach(ctx context.Context, n, parallel int, newWorker func() func(int) error) error {
	jobs := make(chan int)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(jobs)
		for i := range n {
			select {
			case jobs <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range parallel {
		g.Go(func() error {
			fn := newWorker()
			for i := range jobs {
				if err := fn(i); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// zeroRange makes [off, off+n) of dst read as zeros: a discard, or with
// noDiscard WriteZeroes where the device has it, else a write of zeros
// (scratch is a block-sized buffer it may clear).
func zeroRange(dst blockdev.Device, off, n int64, noDiscard bool, scratch []byte) error {
	if !noDiscard {
		return dst.Discard(off, n)
	}
	if z, ok := dst.(blockdev.ZeroWriter); ok {
		return z.WriteZeroes(off, n)
	}
	clear(scratch[:n])
	_, err := dst.WriteAt(scratch[:n], off)
	return err
}
