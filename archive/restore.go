package archive

import (
	"cmp"
	"context"
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

func (r *Repo) restore(ctx context.Context, m *Manifest, dst blockdev.Device, o RestoreOptions, c *counters) error {
	jobs := make(chan int)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(jobs)
		for i := range m.Blocks {
			select {
			case jobs <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range cmp.Or(max(o.Parallel, 0), 8) {
		g.Go(func() error {
			buf := make([]byte, 0, m.BlockSize)
			cur := make([]byte, m.BlockSize)
			hs := r.newHasher()
			for i := range jobs {
				if err := r.restoreBlock(gctx, m, i, dst, o, hs, buf, cur, c); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

func (r *Repo) restoreBlock(ctx context.Context, m *Manifest, i int, dst blockdev.Device, o RestoreOptions,
	hs *hasher, buf, cur []byte, c *counters) error {
	off := int64(i) * int64(m.BlockSize)
	n := m.blockLen(i)
	h := m.Blocks[i]
	defer func() { c.done.Add(int64(n)); c.blocks.Add(1) }()
	if o.Resume {
		if _, err := dst.ReadAt(cur[:n], off); err != nil {
			return fmt.Errorf("read destination at %d: %w", off, err)
		}
		if hs.sum(cur[:n]) == h {
			c.deduped.Add(1)
			return nil
		}
	}
	if h.IsZero() {
		c.zero.Add(1)
		return zeroRange(dst, off, int64(n), o.NoDiscard, cur)
	}
	plain, stored, err := r.fetchBlock(ctx, m, i, buf)
	if err != nil {
		return err
	}
	c.uploaded.Add(1)
	c.stored.Add(int64(stored))
	if _, err := dst.WriteAt(plain, off); err != nil {
		return fmt.Errorf("write block %d at %d: %w", i, off, err)
	}
	return nil
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
