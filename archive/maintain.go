package archive

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// BlockError names a block that could not be read back: the backup that
// references it, its index and byte offset in that backup's volume, and its
// hash. It wraps ErrNotFound (missing) or ErrCorrupt (damaged).
type BlockError struct {
	Backup string
	Index  int
	Offset int64
	Hash   Hash
	Err    error
}

func (e *BlockError) Error() string {
	return fmt.Sprintf("archive: backup %s block %d at offset %d (%s): %v", e.Backup, e.Index, e.Offset, blockKey(e.Hash), e.Err)
}

func (e *BlockError) Unwrap() error { return e.Err }

// Manifest reads backup id's manifest.
func (r *Repo) Manifest(ctx context.Context, id string) (*Manifest, error) {
	if !validID(id) {
		return nil, fmt.Errorf("archive: backup ID %q: %w", id, ErrOptions)
	}
	key := manifestKey(id)
	obj, err := r.be.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("archive: backup %s: %w", id, err)
	}
	plain, err := r.codec.open(key, obj, nil)
	if err != nil {
		return nil, err
	}
	m, err := decodeManifest(plain)
	if err != nil {
		return nil, fmt.Errorf("archive: backup %s: %w", id, err)
	}
	if m.ID != id || m.BlockSize != r.cfg.BlockSize {
		return nil, fmt.Errorf("archive: backup %s: manifest says ID %q, block size %d: %w", id, m.ID, m.BlockSize, ErrCorrupt)
	}
	return m, nil
}

func (r *Repo) putManifest(ctx context.Context, m *Manifest) error {
	key := manifestKey(m.ID)
	bp := r.codec.seal(key, m.encode())
	defer r.codec.bufs.Put(bp)
	return r.be.Put(ctx, key, *bp)
}

// Backups reads every manifest, oldest first.
func (r *Repo) Backups(ctx context.Context) ([]*Manifest, error) {
	var out []*Manifest
	for o, err := range r.be.List(ctx, "manifests/") {
		if err != nil {
			return nil, err
		}
		m, err := r.Manifest(ctx, strings.TrimPrefix(o.Key, "manifests/"))
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b *Manifest) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// DeleteBackup removes a backup's manifest. Its blocks stay until GC finds
// them unreferenced. Incrementals made from it keep working: a manifest
// lists every block by hash, not by reference to its parent.
func (r *Repo) DeleteBackup(ctx context.Context, id string) error {
	if _, err := r.Manifest(ctx, id); err != nil {
		return err
	}
	return r.be.Delete(ctx, manifestKey(id))
}

// GCOptions configures GC.
type GCOptions struct {
	// DryRun counts what would be deleted and deletes nothing.
	DryRun bool
	// Grace keeps packs written less than this long before the newest
	// pack (by the server's clock); 0 keeps none. The lock is what makes
	// GC safe; Grace is for writers that do not take it.
	Grace time.Duration
	// LockTTL is how long a lock counts without a refresh; 0 means
	// DefaultLockTTL. Every client of a repository must use the same.
	LockTTL time.Duration
	// Parallel packs processed at once; 0 means 8.
	Parallel int
}

// GCResult counts what GC found and did. Unreferenced blocks are deleted
// by deleting their pack, after copying the pack's referenced blocks (if
// any) to a new pack.
type GCResult struct {
	Backups, Referenced, Unreferenced, Deleted int
	DeletedBytes                               int64
	PacksDeleted, PacksRewritten, Orphans      int
}

// gcPlan is what GC does to one pack.
type gcPlan struct {
	id        string
	live      []idxEntryT // blocks to copy to a new pack first
	dead      int
	deadBytes int64
	indexed   bool // has an index object to delete
}

// GC deletes the blocks no manifest references. It takes the repository's
// GC lock (ErrLocked while a backup runs, and backups fail with ErrLocked
// while it runs). A manifest that cannot be read stops it: deleting blocks
// without knowing every reference could destroy a backup. Packs without an
// index (left by an interrupted backup) are deleted too.
func (r *Repo) GC(ctx context.Context, o GCOptions) (*GCResult, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	lk, err := r.lock(ctx, "gc", o.LockTTL, cancel)
	if err != nil {
		return nil, err
	}
	defer lk.release()
	ms, err := r.Backups(ctx)
	if err != nil {
		return nil, fmt.Errorf("archive: gc: %w", err)
	}
	if err := r.refreshIndex(ctx); err != nil {
		return nil, fmt.Errorf("archive: gc: %w", err)
	}
	packs, newest, err := r.listPacks(ctx)
	if err != nil {
		return nil, fmt.Errorf("archive: gc: %w", err)
	}
	res := &GCResult{Backups: len(ms)}
	ref := make(map[Hash]struct{})
	for _, m := range ms {
		for _, h := range m.Blocks {
			if !h.IsZero() {
				ref[h] = struct{}{}
			}
		}
	}
	res.Referenced = len(ref)
	plans := r.gcPlans(ref, packs, func(id string) bool {
		ob, ok := packs[id]
		return ok && o.Grace > 0 && newest.Sub(ob.ModTime) < o.Grace
	}, res)
	if o.DryRun {
		return res, nil
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(cmp.Or(max(o.Parallel, 0), 8))
	var mu sync.Mutex // guards res's counts
	for _, p := range plans {
		g.Go(func() error {
			if err := r.gcPack(gctx, p); err != nil {
				return err
			}
			mu.Lock()
			res.Deleted += p.dead
			res.DeletedBytes += p.deadBytes
			res.PacksDeleted++
			if len(p.live) > 0 {
				res.PacksRewritten++
			}
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return res, fmt.Errorf("archive: gc: %w", err)
	}
	return res, nil
}

// gcPlans lists the packs holding unreferenced blocks (a block counts as
// referenced only in the pack the index resolves it to), and the packs with
// no index, skipping young ones; it counts them in res.
func (r *Repo) gcPlans(ref map[Hash]struct{}, packs map[string]ObjectInfo, young func(string) bool, res *GCResult) []gcPlan {
	r.idx.mu.RLock()
	defer r.idx.mu.RUnlock()
	var plans []gcPlan
	for id, es := range r.idx.perPack {
		p := gcPlan{id: id, indexed: true}
		for _, e := range es {
			if _, used := ref[e.h]; used && r.idx.blocks[e.h].pack == id {
				p.live = append(p.live, e)
			} else {
				p.dead++
				p.deadBytes += int64(e.n)
			}
		}
		if p.dead > 0 {
			res.Unreferenced += p.dead
			if !young(id) {
				plans = append(plans, p)
			}
		}
	}
	for id := range packs {
		if _, indexed := r.idx.perPack[id]; !indexed && !young(id) {
			plans = append(plans, gcPlan{id: id})
			res.Orphans++
		}
	}
	return plans
}

// gcPack copies a pack's live blocks to a new pack, then deletes its index
// and the pack: a reader never finds an index without its pack.
func (r *Repo) gcPack(ctx context.Context, p gcPlan) error {
	if len(p.live) > 0 {
		old, err := r.be.Get(ctx, packKey(p.id))
		if err != nil {
			return err
		}
		var buf []byte
		es := make([]idxEntryT, 0, len(p.live))
		for _, e := range p.live {
			if uint64(e.off)+uint64(e.n) > uint64(len(old)) {
				return fmt.Errorf("archive: %s is shorter than its index says: %w", packKey(p.id), ErrCorrupt)
			}
			es = append(es, idxEntryT{h: e.h, off: uint32(len(buf)), n: e.n})
			buf = append(buf, old[e.off:e.off+e.n]...)
		}
		if err := r.writePack(ctx, buf, es); err != nil {
			return err
		}
	}
	if p.indexed {
		if err := r.be.Delete(ctx, indexKey(p.id)); err != nil {
			return err
		}
	}
	if err := r.be.Delete(ctx, packKey(p.id)); err != nil {
		return err
	}
	r.idx.remove(p.id)
	return nil
}

// listPacks lists the pack objects by ID, and the newest one's time.
func (r *Repo) listPacks(ctx context.Context) (map[string]ObjectInfo, time.Time, error) {
	packs := make(map[string]ObjectInfo)
	var newest time.Time
	for o, err := range r.be.List(ctx, packDir) {
		if err != nil {
			return nil, newest, err
		}
		id := o.Key[strings.LastIndexByte(o.Key, '/')+1:]
		if validPackID(id) && o.Key == packKey(id) {
			packs[id] = o
			if o.ModTime.After(newest) {
				newest = o.ModTime
			}
		}
	}
	return packs, newest, nil
}

// VerifyOptions configures Verify.
type VerifyOptions struct {
	// Backups to check; empty means all.
	Backups []string
	// ReadData downloads every referenced block and checks its hash.
	// Without it, Sample (0 to 1) is the fraction of blocks downloaded;
	// the rest are only checked to exist.
	ReadData bool
	Sample   float64
	// Seed picks the sample; 0 means a random one.
	Seed     uint64
	Parallel int // 0 means 8
}

// VerifyResult reports a verification. Problems name each bad block.
type VerifyResult struct {
	Backups, Blocks, Read int
	Problems              []*BlockError
}

// Verify checks that every block the chosen backups reference exists, and
// that the ones it reads match their hashes. It returns an error (a
// *BlockError for the first problem) when it found any.
func (r *Repo) Verify(ctx context.Context, o VerifyOptions) (*VerifyResult, error) {
	var ms []*Manifest
	if len(o.Backups) == 0 {
		var err error
		if ms, err = r.Backups(ctx); err != nil {
			return nil, err
		}
	}
	for _, id := range o.Backups {
		m, err := r.Manifest(ctx, id)
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	if err := r.refreshIndex(ctx); err != nil {
		return nil, err
	}
	packs, _, err := r.listPacks(ctx)
	if err != nil {
		return nil, err
	}
	seed := o.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	res := &VerifyResult{Backups: len(ms)}
	seen := make(map[Hash]struct{})
	type ref struct {
		m *Manifest
		i int
	}
	var toRead []ref
	for _, m := range ms {
		for i, h := range m.Blocks {
			if h.IsZero() {
				continue
			}
			if _, dup := seen[h]; dup {
				continue
			}
			seen[h] = struct{}{}
			res.Blocks++
			if l, ok := r.idx.lookup(h); !ok || packs[l.pack].Key == "" {
				res.Problems = append(res.Problems, &BlockError{Backup: m.ID, Index: i,
					Offset: int64(i) * int64(m.BlockSize), Hash: h, Err: ErrNotFound})
				continue
			}
			if o.ReadData || rng.Float64() < o.Sample {
				toRead = append(toRead, ref{m, i})
			}
		}
	}
	res.Read = len(toRead)
	var mu sync.Mutex // guards res.Problems
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(cmp.Or(max(o.Parallel, 0), 8))
	for _, rf := range toRead {
		g.Go(func() error {
			_, _, err := r.fetchBlock(gctx, rf.m, rf.i, nil)
			var be *BlockError
			if errors.As(err, &be) {
				mu.Lock()
				res.Problems = append(res.Problems, be)
				mu.Unlock()
				return nil
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	slices.SortFunc(res.Problems, func(a, b *BlockError) int {
		return strings.Compare(fmt.Sprint(a.Backup, a.Offset), fmt.Sprint(b.Backup, b.Offset))
	})
	if len(res.Problems) > 0 {
		return res, fmt.Errorf("archive: verify: %d bad blocks; first: %w", len(res.Problems), res.Problems[0])
	}
	return res, nil
}

// fetchBlock downloads block i of m into dst (reused if large enough) and
// checks its hash; it also returns the object's stored size. A missing or
// damaged block gives a *BlockError.
func (r *Repo) fetchBlock(ctx context.Context, m *Manifest, i int, dst []byte) ([]byte, int, error) {
	h := m.Blocks[i]
	l, ok := r.idx.lookup(h)
	if !ok {
		return nil, 0, blockErr(m, i, fmt.Errorf("in no pack's index: %w", ErrNotFound))
	}
	obj, err := r.be.GetRange(ctx, packKey(l.pack), int64(l.off), int64(l.n))
	if errors.Is(err, ErrNotFound) {
		return nil, 0, blockErr(m, i, err)
	}
	if err != nil {
		return nil, 0, err
	}
	plain, err := r.openBlock(m, i, obj, dst)
	return plain, len(obj), err
}

func blockErr(m *Manifest, i int, err error) *BlockError {
	return &BlockError{Backup: m.ID, Index: i, Offset: int64(i) * int64(m.BlockSize), Hash: m.Blocks[i], Err: err}
}

// openBlock decodes block i of m from its stored bytes obj (which it may
// overwrite) into dst and checks its length and hash.
func (r *Repo) openBlock(m *Manifest, i int, obj, dst []byte) ([]byte, error) {
	h := m.Blocks[i]
	if l, ok := r.idx.lookup(h); ok && len(obj) != int(l.n) {
		return nil, blockErr(m, i, fmt.Errorf("%s is shorter than its index says: %w", packKey(l.pack), ErrCorrupt))
	}
	plain, err := r.codec.open(blockKey(h), obj, dst)
	if err != nil {
		return nil, blockErr(m, i, err)
	}
	if len(plain) != m.blockLen(i) {
		return nil, blockErr(m, i, fmt.Errorf("length %d, want %d: %w", len(plain), m.blockLen(i), ErrCorrupt))
	}
	hs := r.getHasher()
	sum := hs.sum(plain)
	r.hashers.Put(hs)
	if sum != h {
		return nil, blockErr(m, i, fmt.Errorf("hash mismatch: %w", ErrCorrupt))
	}
	return plain, nil
}
