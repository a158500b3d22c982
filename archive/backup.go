package archive

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"iter"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bits-and-blooms/bitset"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// Extent is a byte range of a volume.
type Extent struct{ Off, Len int64 }

// BackupOptions configures a backup. Only Changed distinguishes an
// incremental backup's work from a full one's.
type BackupOptions struct {
	// ID names the backup ([A-Za-z0-9._-], at most 128 characters); empty
	// means a new time-ordered ID.
	ID string
	// Parent is the backup this one is incremental to; "" for a full
	// backup. Blocks outside Changed are taken from the parent's manifest.
	Parent string
	// Changed yields the byte ranges that may differ from what Parent
	// backed up (a snapshot store's Diff). Nil with a Parent means every
	// block is read. Ignored without a Parent.
	Changed iter.Seq2[Extent, error]
	// Volume is the volume's identity, Snapshot and SnapID the snapshot's
	// name and store ID; they are recorded in the manifest.
	Volume, Snapshot string
	SnapID           uint64
	// Parallel is the number of blocks read, compressed and uploaded at
	// once; 0 means 8.
	Parallel int
	// Progress, if set, is called about every ProgressInterval (0 means
	// 500 ms) and once at the end, never concurrently.
	Progress         func(Progress)
	ProgressInterval time.Duration
	// LockTTL: see GCOptions; 0 means DefaultLockTTL.
	LockTTL time.Duration
	// PackSize is the size blocks are gathered into before upload; 0 means
	// DefaultPackSize. An interrupted backup loses at most the packs not
	// yet uploaded.
	PackSize int
}

// Progress reports a backup or restore in flight.
type Progress struct {
	TotalBytes int64 // bytes this run reads (backup) or writes (restore)
	DoneBytes  int64
	// Blocks processed so far, and how they went: sent to the repository
	// (a restore: written from fetched data), already there (deduplicated,
	// a parent's unchanged block; a restore: already right on the
	// destination), or zeros.
	Blocks, Uploaded, Deduped, Zero int
	// StoredBytes: bytes sent (backup) or fetched (restore), in stored
	// form (compressed and encrypted).
	StoredBytes int64
	Elapsed     time.Duration
	// ETA is the estimated time left, from the rate so far; 0 until
	// something is done.
	ETA time.Duration
}

func (p Progress) String() string {
	pct := 100.0
	if p.TotalBytes > 0 {
		pct = 100 * float64(p.DoneBytes) / float64(p.TotalBytes)
	}
	return fmt.Sprintf("%5.1f%% %d/%d MiB, %d blocks (%d sent, %d dedup, %d zero), %d MiB stored, ETA %s",
		pct, p.DoneBytes>>20, p.TotalBytes>>20, p.Blocks, p.Uploaded, p.Deduped, p.Zero, p.StoredBytes>>20,
		p.ETA.Round(time.Second))
}

// counters are the live, atomically updated form of Progress.
type counters struct {
	start                           time.Time
	total                           int64
	done, stored                    atomic.Int64
	blocks, uploaded, deduped, zero atomic.Int64
}

func (c *counters) snapshot() Progress {
	p := Progress{TotalBytes: c.total, DoneBytes: c.done.Load(), StoredBytes: c.stored.Load(),
		Blocks: int(c.blocks.Load()), Uploaded: int(c.uploaded.Load()), Deduped: int(c.deduped.Load()),
		Zero: int(c.zero.Load()), Elapsed: time.Since(c.start)}
	if p.DoneBytes > 0 && p.TotalBytes > p.DoneBytes {
		p.ETA = time.Duration(float64(p.Elapsed) * float64(p.TotalBytes-p.DoneBytes) / float64(p.DoneBytes))
	}
	return p
}

// report calls fn every interval until stop is closed, then once more; the
// returned function stops it and waits.
func (c *counters) report(fn func(Progress), interval time.Duration) (stop func()) {
	if fn == nil {
		return func() {}
	}
	if interval <= 0 {
		interval = 500 * time.Millisecond
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				fn(c.snapshot())
				return
			case <-t.C:
				fn(c.snapshot())
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// BackupResult is what a backup made.
type BackupResult struct {
	Manifest *Manifest
	Progress Progress // the final counts
}

// Backup reads src and stores it as a new backup. Only blocks that are not
// zeros and not already in the repository are uploaded, so running the same
// backup again after an interruption sends only what the first run did not
// (the repository's index is read at the start).
func (r *Repo) Backup(ctx context.Context, src blockdev.Device, o BackupOptions) (*BackupResult, error) {
	if o.ID == "" {
		o.ID = newBackupID()
	}
	if !validID(o.ID) || (o.Parent != "" && !validID(o.Parent)) {
		return nil, fmt.Errorf("archive: backup ID %q or parent %q: %w", o.ID, o.Parent, ErrOptions)
	}
	if len(o.Volume) > maxString || len(o.Snapshot) > maxString {
		return nil, fmt.Errorf("archive: volume or snapshot name too long: %w", ErrOptions)
	}
	bs := r.cfg.BlockSize
	if src.Size() <= 0 || bs%src.BlockSize() != 0 {
		return nil, fmt.Errorf("archive: device block size %d does not divide block size %d: %w", src.BlockSize(), bs, ErrOptions)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	lk, err := r.lock(ctx, "backup", o.LockTTL, cancel)
	if err != nil {
		return nil, err
	}
	defer lk.release()

	m := &Manifest{ID: o.ID, Parent: o.Parent, Volume: o.Volume, Snapshot: o.Snapshot, SnapID: o.SnapID,
		Created: time.Now().UTC(), Size: src.Size(), BlockSize: bs, DevBlock: src.BlockSize()}
	nblocks := int((m.Size + int64(bs) - 1) / int64(bs))
	m.Blocks = make([]Hash, nblocks)
	if _, err := r.be.Get(ctx, manifestKey(o.ID)); err == nil {
		return nil, fmt.Errorf("archive: backup %s: %w", o.ID, ErrExists)
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}

	if err := r.refreshIndex(ctx); err != nil {
		return nil, err
	}
	known := r.idx.known()
	todo, err := r.blocksToRead(ctx, m, o, known)
	if err != nil {
		return nil, err
	}
	c := &counters{start: time.Now()}
	for i := range todo.EachSet() {
		c.total += int64(m.blockLen(int(i)))
	}
	c.deduped.Store(int64(uint(nblocks) - todo.Count()))
	c.blocks.Store(int64(uint(nblocks) - todo.Count()))
	stop := c.report(o.Progress, o.ProgressInterval)
	pk := &packer{r: r, size: cmp.Or(max(o.PackSize, 0), DefaultPackSize)}
	err = r.uploadBlocks(ctx, src, m, todo, known, o.Parallel, pk, c)
	if err == nil {
		err = pk.flush(ctx)
	}
	if err == nil {
		err = r.putManifest(ctx, m)
	}
	stop()
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%w)", err, cause)
		}
		return nil, fmt.Errorf("archive: backup %s: %w", o.ID, err)
	}
	return &BackupResult{Manifest: m, Progress: c.snapshot()}, nil
}

// blocksToRead returns the blocks a backup must read, filling m.Blocks with
// the parent's hashes for the rest. A parent block the index does not
// hold is read again rather than referenced.
func (r *Repo) blocksToRead(ctx context.Context, m *Manifest, o BackupOptions, known map[Hash]struct{}) (*bitset.BitSet, error) {
	n := uint(len(m.Blocks))
	todo := bitset.New(n)
	if o.Parent == "" {
		return todo.FlipRange(0, n), nil
	}
	pm, err := r.Manifest(ctx, o.Parent)
	if err != nil {
		return nil, err
	}
	if pm.Size != m.Size || pm.BlockSize != m.BlockSize || pm.Volume != m.Volume {
		return nil, fmt.Errorf("archive: parent %s is %q, %d bytes, not %q, %d bytes: %w",
			pm.ID, pm.Volume, pm.Size, m.Volume, m.Size, ErrBadParent)
	}
	if o.Changed == nil {
		return todo.FlipRange(0, n), nil
	}
	bs := int64(m.BlockSize)
	for e, err := range o.Changed {
		if err != nil {
			return nil, fmt.Errorf("archive: changed ranges: %w", err)
		}
		if e.Off < 0 || e.Len < 0 || e.Off+e.Len > m.Size {
			return nil, fmt.Errorf("archive: changed range %d+%d beyond size %d: %w", e.Off, e.Len, m.Size, ErrOptions)
		}
		for b := e.Off / bs; b < (e.Off+e.Len+bs-1)/bs; b++ {
			todo.Set(uint(b))
		}
	}
	return r.fillFromParent(m, pm, todo, known), nil
}

func (r *Repo) fillFromParent(m, pm *Manifest, todo *bitset.BitSet, known map[Hash]struct{}) *bitset.BitSet {
	for i, h := range pm.Blocks {
		if todo.Test(uint(i)) {
			continue
		}
		if _, ok := known[h]; !ok && !h.IsZero() {
			todo.Set(uint(i))
			continue
		}
		m.Blocks[i] = h
	}
	return todo
}

func (r *Repo) uploadBlocks(ctx context.Context, src blockdev.Device, m *Manifest, todo *bitset.BitSet,
	known map[Hash]struct{}, parallel int, pk *packer, c *counters) error {
	if parallel <= 0 {
		parallel = 8
	}
	var mu sync.Mutex // guards known while the workers run
	jobs := make(chan int)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(jobs)
		for i := range todo.EachSet() {
			select {
			case jobs <- int(i):
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range parallel {
		g.Go(func() error {
			buf := make([]byte, m.BlockSize)
			h := r.newHasher()
			for i := range jobs {
				p := buf[:m.blockLen(i)]
				if _, err := src.ReadAt(p, int64(i)*int64(m.BlockSize)); err != nil {
					return fmt.Errorf("read block %d at %d: %w", i, int64(i)*int64(m.BlockSize), err)
				}
				sum := h.sum(p)
				m.Blocks[i] = sum
				c.done.Add(int64(len(p)))
				c.blocks.Add(1)
				if sum.IsZero() {
					c.zero.Add(1)
					continue
				}
				mu.Lock()
				_, have := known[sum]
				known[sum] = struct{}{} // claimed: a failed upload fails the backup
				mu.Unlock()
				if have {
					c.deduped.Add(1)
					continue
				}
				bp := r.codec.seal(blockKey(sum), p)
				n := len(*bp)
				err := pk.add(gctx, sum, *bp)
				r.codec.bufs.Put(bp)
				if err != nil {
					return err
				}
				c.uploaded.Add(1)
				c.stored.Add(int64(n))
			}
			return nil
		})
	}
	return g.Wait()
}

// hasher names blocks; one per goroutine (it keeps state between calls).
type hasher struct {
	h    hash.Hash
	zero []byte
	out  []byte
}

func (r *Repo) newHasher() *hasher {
	if r.macKey != nil {
		return &hasher{h: hmac.New(sha256.New, r.macKey), zero: make([]byte, r.cfg.BlockSize), out: make([]byte, 0, 32)}
	}
	return &hasher{h: sha256.New(), zero: make([]byte, r.cfg.BlockSize), out: make([]byte, 0, 32)}
}

// sum returns p's name, or the zero Hash if p is all zeros.
func (h *hasher) sum(p []byte) Hash {
	var s Hash
	if bytes.Equal(p, h.zero[:len(p)]) {
		return s
	}
	h.h.Reset()
	h.h.Write(p)
	copy(s[:], h.h.Sum(h.out[:0]))
	return s
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

func newBackupID() string {
	return time.Now().UTC().Format("20060102T150405.000Z") + "-" + randomHex(3)
}

// BackupSnapshot backs up snap, a snapshot in st. With parentSnap (an
// earlier snapshot of the same volume) only the blocks st.Diff reports
// changed between the two are read; the parent backup is o.Parent, or if
// that is empty the newest backup of parentSnap (FindBackup). The
// manifest records the snapshot's name and ID, and the volume's identity
// (o.Volume, or the ID of the volume the snapshot was taken of).
func (r *Repo) BackupSnapshot(ctx context.Context, st *snapshot.Store, snap, parentSnap *snapshot.Volume, o BackupOptions) (*BackupResult, error) {
	info := snap.Info()
	if info.Kind != snapshot.KindSnapshot {
		return nil, fmt.Errorf("archive: %s is a %s, not a snapshot: %w", info.Name, info.Kind, ErrOptions)
	}
	o.Snapshot, o.SnapID = info.Name, info.ID
	if o.Volume == "" {
		o.Volume = fmt.Sprintf("volume-%d", info.Parent)
	}
	if parentSnap == nil {
		o.Changed = nil
		if o.Parent != "" {
			return nil, fmt.Errorf("archive: parent backup %s without its snapshot: %w", o.Parent, ErrOptions)
		}
		return r.Backup(ctx, snap, o)
	}
	var pm *Manifest
	var err error
	if o.Parent == "" {
		if pm, err = r.FindBackup(ctx, o.Volume, parentSnap); err != nil {
			return nil, err
		}
		o.Parent = pm.ID
	} else if pm, err = r.Manifest(ctx, o.Parent); err != nil {
		return nil, err
	}
	if pm.SnapID != parentSnap.ID() || pm.Snapshot != parentSnap.Info().Name {
		return nil, fmt.Errorf("archive: backup %s was made of snapshot %q (id %d), not %q (id %d): %w",
			pm.ID, pm.Snapshot, pm.SnapID, parentSnap.Info().Name, parentSnap.ID(), ErrBadParent)
	}
	o.Changed = func(yield func(Extent, error) bool) {
		for e, err := range st.Diff(parentSnap, snap) {
			if !yield(Extent{Off: e.Off, Len: e.Len}, err) || err != nil {
				return
			}
		}
	}
	return r.Backup(ctx, snap, o)
}

// FindBackup returns the newest backup of snapshot snap of the volume named
// volume ("" matches any), or an error wrapping ErrNotFound.
func (r *Repo) FindBackup(ctx context.Context, volume string, snap *snapshot.Volume) (*Manifest, error) {
	ms, err := r.Backups(ctx)
	if err != nil {
		return nil, err
	}
	info := snap.Info()
	for i := len(ms) - 1; i >= 0; i-- {
		m := ms[i]
		if m.SnapID == info.ID && m.Snapshot == info.Name && (volume == "" || m.Volume == volume) {
			return m, nil
		}
	}
	return nil, fmt.Errorf("archive: no backup of snapshot %q (id %d) of volume %q: %w", info.Name, info.ID, volume, ErrNotFound)
}
