package archive

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot"
)

func TestBackupRestoreDir(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
	}{
		{"plain", Options{}},
		{"encrypted", Options{Passphrase: []byte("correct horse")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			rng := rand.New(rand.NewPCG(testSeed(t), 1))
			r, _ := dirRepo(t, tc.o)
			src := memDev(t, 4<<20+64<<10) // a short last block
			fillVolume(t, src, rng)
			same := make([]byte, 64<<10) // one block's content at three offsets
			for i := range same {
				same[i] = byte(rng.Uint32())
			}
			for _, b := range []int64{10, 20, 30} {
				_, err := src.WriteAt(same, b*64<<10)
				require.NoError(t, err)
			}
			res, err := r.Backup(ctx, src, BackupOptions{Volume: "vol"})
			require.NoError(t, err)
			p := res.Progress
			require.Equal(t, src.Size(), p.DoneBytes)
			require.Equal(t, len(res.Manifest.Blocks), p.Blocks)
			require.Positive(t, p.Zero)
			require.Positive(t, p.Uploaded)

			// The same data again: nothing is uploaded.
			res2, err := r.Backup(ctx, src, BackupOptions{Volume: "vol"})
			require.NoError(t, err)
			require.Zero(t, res2.Progress.Uploaded)
			require.Equal(t, res.Manifest.Blocks, res2.Manifest.Blocks)

			dst := memDev(t, src.Size())
			_, err = dst.WriteAt(make([]byte, 4096), 0)
			require.NoError(t, err)
			rp, err := r.Restore(ctx, res.Manifest.ID, dst, RestoreOptions{})
			require.NoError(t, err)
			require.Equal(t, p.Zero, rp.Zero)
			requireSame(t, src, dst, src.Size())
			// Zero blocks became holes.
			require.Less(t, dst.Allocated(), src.Size())

			// A resumed restore over a damaged destination fetches only
			// the damaged block.
			junk := make([]byte, 4096)
			junk[0] = 1
			var dataOff int64 = -1
			for i, h := range res.Manifest.Blocks {
				if !h.IsZero() {
					dataOff = int64(i) * int64(r.BlockSize())
					break
				}
			}
			_, err = dst.WriteAt(junk, dataOff)
			require.NoError(t, err)
			rp, err = r.Restore(ctx, res.Manifest.ID, dst, RestoreOptions{Resume: true})
			require.NoError(t, err)
			require.Equal(t, 1, rp.Uploaded)
			requireSame(t, src, dst, src.Size())

			ms, err := r.Backups(ctx)
			require.NoError(t, err)
			require.Len(t, ms, 2)
			vr, err := r.Verify(ctx, VerifyOptions{ReadData: true})
			require.NoError(t, err)
			require.Equal(t, vr.Blocks, vr.Read)
		})
	}
}

func TestWrongKey(t *testing.T) {
	ctx := context.Background()
	r, be := dirRepo(t, Options{Passphrase: []byte("right")})
	_, err := r.Backup(ctx, memDev(t, 1<<20), BackupOptions{})
	require.NoError(t, err)
	_, err = OpenRepo(ctx, be, Options{Passphrase: []byte("wrong")})
	require.ErrorIs(t, err, ErrWrongKey)
	_, err = OpenRepo(ctx, be, Options{})
	require.ErrorIs(t, err, ErrNeedKey)
	r2, err := OpenRepo(ctx, be, Options{Passphrase: []byte("right")})
	require.NoError(t, err)
	defer r2.Close()
	ms, err := r2.Backups(ctx)
	require.NoError(t, err)
	require.Len(t, ms, 1)

	// A plaintext repository opened with a key still opens (the key is
	// unused); an encrypted object in it is rejected as corrupt.
	_, err = Create(ctx, be, Options{})
	require.ErrorIs(t, err, ErrExists)
	_, err = OpenRepo(ctx, mustDir(t, t.TempDir()), Options{})
	require.ErrorIs(t, err, ErrNoRepo)
}

// blockObject says where block h is stored: its pack's key and its range.
func blockObject(t *testing.T, r *Repo, h Hash) (key string, off, n int) {
	require.NoError(t, r.refreshIndex(context.Background()))
	l, ok := r.idx.lookup(h)
	require.True(t, ok, "block %s not indexed", h)
	return packKey(l.pack), int(l.off), int(l.n)
}

func mustDir(t *testing.T, root string) *Dir {
	d, err := NewDir(root)
	require.NoError(t, err)
	return d
}

// newStore formats a snapshot store on memory devices.
func newStore(t *testing.T, size int64) (*snapshot.Store, *snapshot.Volume) {
	st, err := snapshot.Format(memDev(t, size), memDev(t, size), snapshot.Options{ChunkSize: 4096, CommitInterval: -1})
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	live := st.Origin()
	t.Cleanup(func() { live.Close() })
	return st, live
}

func TestIncrementalSnapshot(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 2))
	r, _ := dirRepo(t, Options{})
	const size = 8 << 20
	st, live := newStore(t, size)
	fillVolume(t, live, rng)
	s1, err := st.CreateSnapshot("s1", live)
	require.NoError(t, err)
	full, err := r.BackupSnapshot(ctx, st, s1, nil, BackupOptions{})
	require.NoError(t, err)

	// Change a few 4 KiB blocks; the incremental reads only their blocks.
	touched := map[int64]bool{}
	buf := make([]byte, 4096)
	for range 5 {
		off := rng.Int64N(size/4096) * 4096
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		_, err := live.WriteAt(buf, off)
		require.NoError(t, err)
		touched[off/int64(r.BlockSize())] = true
	}
	s2, err := st.CreateSnapshot("s2", live)
	require.NoError(t, err)
	inc, err := r.BackupSnapshot(ctx, st, s2, s1, BackupOptions{}) // the parent backup is found
	require.NoError(t, err)
	require.Equal(t, full.Manifest.ID, inc.Manifest.Parent)
	require.Equal(t, int64(len(touched))*int64(r.BlockSize()), inc.Progress.TotalBytes)
	require.Equal(t, len(touched), inc.Progress.Uploaded)
	require.Equal(t, "s2", inc.Manifest.Snapshot)
	require.Equal(t, full.Manifest.Volume, inc.Manifest.Volume)

	dst := memDev(t, size)
	_, err = r.Restore(ctx, inc.Manifest.ID, dst, RestoreOptions{Parallel: 3})
	require.NoError(t, err)
	requireSame(t, s2, dst, size)

	// The wrong parent snapshot for a backup is refused.
	_, err = r.BackupSnapshot(ctx, st, s2, s2, BackupOptions{Parent: full.Manifest.ID})
	require.ErrorIs(t, err, ErrBadParent)
	s3, err := st.CreateSnapshot("s3", live)
	require.NoError(t, err)
	_, err = r.BackupSnapshot(ctx, st, s3, s3, BackupOptions{})
	require.ErrorIs(t, err, ErrNotFound) // s3 has no backup

	// Deleting the parent keeps the incremental whole; GC then frees the
	// parent's blocks the incremental replaced.
	require.NoError(t, r.DeleteBackup(ctx, full.Manifest.ID))
	gr, err := r.GC(ctx, GCOptions{})
	require.NoError(t, err)
	replaced := 0 // the changed blocks' old versions, where they were not zeros
	for i := range touched {
		if !full.Manifest.Blocks[i].IsZero() {
			replaced++
		}
	}
	require.Equal(t, replaced, gr.Deleted)
	_, err = r.Verify(ctx, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	_, err = r.Restore(ctx, inc.Manifest.ID, dst, RestoreOptions{})
	require.NoError(t, err)
	requireSame(t, s2, dst, size)
}

func TestGCLock(t *testing.T) {
	ctx := context.Background()
	r, be := dirRepo(t, Options{})
	lk, err := r.lock(ctx, "backup", 0, func(error) {})
	require.NoError(t, err)
	_, err = r.GC(ctx, GCOptions{})
	require.ErrorIs(t, err, ErrLocked)
	lk2, err := r.lock(ctx, "backup", 0, func(error) {}) // backups share
	require.NoError(t, err)
	lk.release()
	lk2.release()

	gl, err := r.lock(ctx, "gc", 0, func(error) {})
	require.NoError(t, err)
	_, err = r.Backup(ctx, memDev(t, 1<<20), BackupOptions{})
	require.ErrorIs(t, err, ErrLocked)
	gl.release()
	_, err = r.Backup(ctx, memDev(t, 1<<20), BackupOptions{})
	require.NoError(t, err)

	// A lock its holder stopped refreshing (it died) goes stale after the
	// TTL and blocks nothing.
	dead, err := r.lock(ctx, "backup", 0, func(error) {})
	require.NoError(t, err)
	close(dead.stop) // the holder dies: no refresh, no release
	dead.wg.Wait()
	old := time.Now().Add(-2 * DefaultLockTTL)
	require.NoError(t, os.Chtimes(filepath.Join(be.root, filepath.FromSlash(dead.key)), old, old))
	_, err = r.GC(ctx, GCOptions{})
	require.NoError(t, err)
}

func TestImageConformance(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 3))
	r, _ := dirRepo(t, Options{})
	src := memDev(t, 2<<20)
	fillVolume(t, src, rng)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		im, err := OpenLazy(ctx, r, res.Manifest.ID, LazyOptions{CacheDir: t.TempDir(), CacheSize: 1})
		require.NoError(t, err)
		return im
	})
}

func TestImage(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 4))
	r, _ := dirRepo(t, Options{Passphrase: []byte("k")})
	src := memDev(t, 4<<20)
	fillVolume(t, src, rng)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	// A cache of 8 blocks for a 64-block volume: reads evict.
	im, err := OpenLazy(ctx, r, res.Manifest.ID, LazyOptions{CacheSize: 8 * 64 << 10})
	require.NoError(t, err)
	requireSame(t, src, im, src.Size())
	a, b := make([]byte, 8192), make([]byte, 8192)
	for range 500 {
		off := rng.Int64N(src.Size()/4096-1) * 4096
		_, err := src.ReadAt(a, off)
		require.NoError(t, err)
		_, err = im.ReadAt(b, off)
		require.NoError(t, err)
		require.Equal(t, a, b, "offset %d", off)
	}
	s := im.Stats()
	require.Positive(t, s.Hits)
	require.Positive(t, s.Misses)

	// A read served from the cache allocates nothing.
	dataOff := int64(-1)
	for i, h := range res.Manifest.Blocks {
		if !h.IsZero() {
			dataOff = int64(i) * int64(r.BlockSize())
			break
		}
	}
	_, err = im.ReadAt(b, dataOff)
	require.NoError(t, err)
	require.Zero(t, testing.AllocsPerRun(100, func() { im.ReadAt(b, dataOff) }))

	// Holes are zero blocks.
	var holes int64
	for off := int64(0); off < im.Size(); {
		n, st, err := im.MapAllocation(off, im.Size()-off)
		require.NoError(t, err)
		if st == blockdev.Hole {
			holes += n
		}
		off += n
	}
	var zeros int64
	for _, h := range res.Manifest.Blocks {
		if h.IsZero() {
			zeros += int64(r.BlockSize())
		}
	}
	require.Equal(t, zeros, holes)
	require.NoError(t, im.Close())
	_, err = im.ReadAt(a, 0)
	require.ErrorIs(t, err, blockdev.ErrClosed)
}

func TestCorruptObjectsDir(t *testing.T) {
	ctx := context.Background()
	r, be := dirRepo(t, Options{})
	src := memDev(t, 1<<20)
	fillVolume(t, src, rand.New(rand.NewPCG(testSeed(t), 5)))
	_, err := src.WriteAt(make([]byte, 4096), 0)
	require.NoError(t, err)
	_, err = src.WriteAt([]byte("x"+string(make([]byte, 4095))), 3*64<<10)
	require.NoError(t, err)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	key, off, n := blockObject(t, r, res.Manifest.Blocks[3])
	obj, err := be.Get(ctx, key)
	require.NoError(t, err)
	obj[off+n-1] ^= 0xff
	require.NoError(t, be.Put(ctx, key, obj))
	_, err = r.Restore(ctx, res.Manifest.ID, memDev(t, 1<<20), RestoreOptions{})
	var berr *BlockError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, 3, berr.Index)
	require.Equal(t, int64(3*64<<10), berr.Offset)
	require.ErrorIs(t, err, ErrCorrupt)

	// A manifest with a flipped byte is rejected.
	key = manifestKey(res.Manifest.ID)
	obj, err = be.Get(ctx, key)
	require.NoError(t, err)
	obj[len(obj)/2] ^= 1
	require.NoError(t, be.Put(ctx, key, obj))
	_, err = r.Manifest(ctx, res.Manifest.ID)
	require.True(t, errors.Is(err, ErrCorrupt), "%v", err)
}

// TestGCPacks: GC deletes packs left without an index by an interrupted
// backup, and a lazy image opened before a GC moved its blocks to new
// packs still reads them.
func TestGCPacks(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 6))
	r, be := dirRepo(t, Options{})
	orphan := packKey(randomHex(packIDLen / 2))
	require.NoError(t, be.Put(ctx, orphan, []byte("left by a dead backup")))

	src := memDev(t, 2<<20)
	fillVolume(t, src, rng)
	first := make([]byte, 64<<10) // block 0: data in both backups, changed in the second
	for i := range first {
		first[i] = byte(rng.Uint32())
	}
	_, err := src.WriteAt(first, 0)
	require.NoError(t, err)
	b1, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	junk := make([]byte, 4096)
	junk[9] = 9
	_, err = src.WriteAt(junk, 0)
	require.NoError(t, err)
	b2, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)

	im, err := Open(ctx, r, b2.Manifest.ID, "")
	require.NoError(t, err)
	defer im.Close()
	require.NoError(t, r.DeleteBackup(ctx, b1.Manifest.ID))
	gr, err := r.GC(ctx, GCOptions{})
	require.NoError(t, err)
	require.Equal(t, 1, gr.Orphans)
	require.Positive(t, gr.PacksRewritten) // b1's pack held blocks b2 still uses
	_, err = be.Get(ctx, orphan)
	require.ErrorIs(t, err, ErrNotFound)
	requireSame(t, src, im, src.Size())
	_, err = r.Verify(ctx, VerifyOptions{ReadData: true})
	require.NoError(t, err)
}

func TestLocations(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct{ in, loc, id string }{
		{"s3://bkt/pre/fix/20261129T000000.000Z-abc", "s3://bkt/pre/fix", "20261129T000000.000Z-abc"},
		{"s3://bkt/b1", "s3://bkt", "b1"},
		{"/var/backups/b1/", "/var/backups", "b1"},
	} {
		loc, id, err := SplitBackup(tc.in)
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.loc, loc)
		require.Equal(t, tc.id, id)
	}
	for _, bad := range []string{"b1", "s3://bkt", "s3://bkt/..", "/x/a b"} {
		_, _, err := SplitBackup(bad)
		require.ErrorIs(t, err, ErrOptions, bad)
	}
	dir := t.TempDir()
	be, err := NewBackend(ctx, "file://"+dir, S3Options{})
	require.NoError(t, err)
	require.IsType(t, &Dir{}, be)
	_, err = NewBackend(ctx, "http://x/y", S3Options{})
	require.ErrorIs(t, err, ErrOptions)
	bucket, prefix, err := ParseS3URL("s3://bkt/a/b/")
	require.NoError(t, err)
	require.Equal(t, "bkt", bucket)
	require.Equal(t, "a/b", prefix)
}

// cancellingDev cancels a context at its n-th read.
type cancellingDev struct {
	blockdev.Device
	reads  atomic.Int64
	n      int64
	cancel context.CancelFunc
}

func (d *cancellingDev) ReadAt(p []byte, off int64) (int, error) {
	if d.reads.Add(1) == d.n {
		d.cancel()
	}
	return d.Device.ReadAt(p, off)
}

func TestBackupCancelResume(t *testing.T) {
	rng := rand.New(rand.NewPCG(testSeed(t), 7))
	r, _ := dirRepo(t, Options{})
	src := randomDev(t, rng, 4<<20)
	ctx, cancel := context.WithCancel(context.Background())
	var last Progress
	_, err := r.Backup(ctx, &cancellingDev{Device: src, n: 40, cancel: cancel},
		BackupOptions{ID: "x", PackSize: 128 << 10, Parallel: 2, Progress: func(p Progress) { last = p }})
	require.ErrorIs(t, err, context.Canceled)
	require.Positive(t, last.TotalBytes)
	res, err := r.Backup(context.Background(), src, BackupOptions{ID: "x", PackSize: 128 << 10})
	require.NoError(t, err)
	require.Positive(t, res.Progress.Deduped)
	require.Less(t, res.Progress.Uploaded, 64)
	dst := memDev(t, src.Size())
	_, err = r.Restore(context.Background(), "x", dst, RestoreOptions{})
	require.NoError(t, err)
	requireSame(t, src, dst, src.Size())
}

// TestImagePrefetch: a read that continues the previous one fetches the
// next blocks in the background, so reading them then fetches nothing.
func TestImagePrefetch(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 8))
	r, _ := dirRepo(t, Options{})
	src := randomDev(t, rng, 1<<20)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	im, err := OpenLazy(ctx, r, res.Manifest.ID, LazyOptions{Prefetch: 4})
	require.NoError(t, err)
	defer im.Close()
	bs := int64(r.BlockSize())
	p := make([]byte, 4096)
	for _, off := range []int64{0, bs} { // block 1 continues block 0
		_, err := im.ReadAt(p, off)
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return im.Stats().Misses == 6 }, 10*time.Second, time.Millisecond,
		"blocks 2 to 5 were not prefetched: %+v", im.Stats())
	hits := im.Stats().Hits
	for blk := int64(5); blk >= 2; blk-- { // backwards: no further prefetch
		_, err := im.ReadAt(p, blk*bs+4096)
		require.NoError(t, err)
	}
	require.Equal(t, int64(6), im.Stats().Misses)
	require.Equal(t, hits+4, im.Stats().Hits)
}
