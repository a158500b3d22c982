package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/archive"
	"github.com/blocksnap/blocksnap/archive/archivetest"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// ArchiveVolumeSize is the volume BenchmarkArchive and the restic
// comparison back up.
const ArchiveVolumeSize = 1 << 30

// ArchiveBlockSize is the repository block size the archive benchmarks use:
// BLOCKSNAP_BENCH_ARCHIVE_BLOCK (bytes) or the package default.
func ArchiveBlockSize() int {
	if v, err := strconv.Atoi(os.Getenv("BLOCKSNAP_BENCH_ARCHIVE_BLOCK")); err == nil && v > 0 {
		return v
	}
	return archive.DefaultBlockSize
}

// FillArchiveVolume writes a disk-image-like mix to d in 64 KiB runs: about
// 30% left zero, 35% random bytes (incompressible), 35% text-like bytes
// from a 16-letter alphabet (compressible about 2:1).
func FillArchiveVolume(d blockdev.Device, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, 0xa4c))
	buf := make([]byte, 1<<20)
	const run = 64 << 10
	for off := int64(0); off < d.Size(); off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), d.Size()-off)]
		for r := 0; r < len(p); r += run {
			q := p[r:min(r+run, len(p))]
			switch x := rng.IntN(100); {
			case x < 30:
				clear(q)
			case x < 65:
				fillRandom(rng, q)
			default:
				for i := range q {
					q[i] = 'a' + byte(rng.IntN(16))
				}
			}
		}
		if _, err := d.WriteAt(p, off); err != nil {
			return err
		}
	}
	return nil
}

func fillRandom(rng *rand.Rand, q []byte) {
	for i := 0; i+8 <= len(q); i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			q[i+j] = byte(v >> (8 * j))
		}
	}
}

// ChangeArchiveVolume overwrites fraction of d's 4 KiB blocks, chosen at
// random (with repeats), with random bytes, and returns how many writes it
// made.
func ChangeArchiveVolume(d blockdev.Device, fraction float64, seed uint64) (int, error) {
	rng := rand.New(rand.NewPCG(seed, 0xc4a))
	n := int(fraction * float64(d.Size()/4096))
	buf := make([]byte, 4096)
	for range n {
		fillRandom(rng, buf)
		if _, err := d.WriteAt(buf, rng.Int64N(d.Size()/4096)*4096); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// archiveBench is BenchmarkArchive's shared state: a gateway, a 1 GiB
// origin in a snapshot store with a first snapshot, and a repository
// holding its full backup (for restore and lazy reads).
type archiveBench struct {
	pool  *Pool
	gw    *archivetest.Gateway
	st    *snapshot.Store
	live  *snapshot.Volume
	snap  *snapshot.Volume
	repo  *archive.Repo
	full  *archive.Manifest
	nrepo int
	// cacheDir holds the lazy images' cache files.
	cacheDir string
}

func newArchiveBench(env Env) (*archiveBench, error) {
	a := &archiveBench{}
	gwDir, err := os.MkdirTemp(env.Dir, "blocksnap-bench-s3-")
	if err != nil {
		return nil, err
	}
	a.cacheDir = gwDir
	if a.gw, err = archivetest.StartGateway(filepath.Join(gwDir, "s3")); err != nil {
		os.RemoveAll(gwDir)
		return nil, err
	}
	if a.pool, err = NewPool(env); err != nil {
		a.Close()
		return nil, err
	}
	if a.st, a.live, err = newSnapshotStore(a.pool, ArchiveVolumeSize, 64<<10); err != nil {
		a.Close()
		return nil, err
	}
	if err := FillArchiveVolume(a.live, 1); err != nil {
		a.Close()
		return nil, err
	}
	if a.snap, err = a.st.CreateSnapshot("s0", a.live); err != nil {
		a.Close()
		return nil, err
	}
	if a.repo, err = a.newRepo(); err != nil {
		a.Close()
		return nil, err
	}
	res, err := a.repo.BackupSnapshot(context.Background(), a.st, a.snap, nil, archive.BackupOptions{})
	if err != nil {
		a.Close()
		return nil, err
	}
	a.full = res.Manifest
	return a, nil
}

// newRepo creates a repository under a fresh prefix of one bucket.
func (a *archiveBench) newRepo() (*archive.Repo, error) {
	ctx := context.Background()
	if a.nrepo == 0 {
		if err := a.gw.MakeBucket(ctx, "bench"); err != nil {
			return nil, err
		}
	}
	a.nrepo++
	o := archive.S3Options{Endpoint: a.gw.Endpoint(), Bucket: "bench", Prefix: fmt.Sprintf("repo%d", a.nrepo),
		PathStyle: true, AccessKey: archivetest.AccessKey, SecretKey: archivetest.SecretKey}
	be, err := archive.NewS3(ctx, o)
	if err != nil {
		return nil, err
	}
	return archive.Create(ctx, be, archive.Options{BlockSize: ArchiveBlockSize()})
}

func (a *archiveBench) Close() {
	if a.st != nil {
		a.st.Close()
	}
	if a.pool != nil {
		a.pool.Close()
	}
	if a.gw != nil {
		a.gw.Kill()
		os.RemoveAll(a.cacheDir)
	}
}

// Archive runs BenchmarkArchive/op=O: full, incremental (after 5% random
// 4 KiB changes), restore (MB/s of volume), lazy-cold and lazy-warm (4 KiB
// random reads of a lazily opened backup, p50/p99).
func Archive(b *testing.B, env Env) {
	if _, err := archivetest.GatewayPath(); err != nil {
		b.Skip(err)
	}
	a, err := newArchiveBench(env)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(a.Close)
	b.Logf("volume %d MiB, block size %d KiB", ArchiveVolumeSize>>20, ArchiveBlockSize()>>10)
	for _, op := range []string{"full", "incremental", "restore", "lazy-cold", "lazy-warm"} {
		b.Run("op="+op, func(b *testing.B) {
			var err error
			switch op {
			case "full":
				err = a.benchFull(b)
			case "incremental":
				err = a.benchIncremental(b)
			case "restore":
				err = a.benchRestore(b)
			default:
				err = a.benchLazy(b, op == "lazy-warm")
			}
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

func (a *archiveBench) benchFull(b *testing.B) error {
	b.SetBytes(ArchiveVolumeSize)
	var stored int64
	for b.Loop() {
		b.StopTimer()
		r, err := a.newRepo()
		if err != nil {
			return err
		}
		b.StartTimer()
		res, err := r.BackupSnapshot(context.Background(), a.st, a.snap, nil, archive.BackupOptions{})
		if err != nil {
			return err
		}
		stored += res.Progress.StoredBytes
		r.Close()
	}
	b.ReportMetric(float64(stored)/float64(b.N), "stored-B/op")
	return nil
}

func (a *archiveBench) benchIncremental(b *testing.B) error {
	ctx := context.Background()
	b.StopTimer()
	r, err := a.newRepo()
	if err != nil {
		return err
	}
	defer r.Close()
	res, err := r.BackupSnapshot(ctx, a.st, a.snap, nil, archive.BackupOptions{})
	if err != nil {
		return err
	}
	parent, parentSnap := res.Manifest.ID, a.snap
	var stored, read int64
	b.SetBytes(ArchiveVolumeSize)
	for i := 0; i < b.N; i++ {
		if _, err := ChangeArchiveVolume(a.live, 0.05, uint64(i)+100); err != nil {
			return err
		}
		s, err := a.st.CreateSnapshot(fmt.Sprintf("inc%d", i), a.live)
		if err != nil {
			return err
		}
		b.StartTimer()
		res, err := r.BackupSnapshot(ctx, a.st, s, parentSnap, archive.BackupOptions{Parent: parent})
		b.StopTimer()
		if err != nil {
			return err
		}
		stored += res.Progress.StoredBytes
		read += res.Progress.TotalBytes
		parent, parentSnap = res.Manifest.ID, s
	}
	b.ReportMetric(float64(stored)/float64(b.N), "stored-B/op")
	b.ReportMetric(float64(read)/float64(b.N), "read-B/op")
	return nil
}

func (a *archiveBench) benchRestore(b *testing.B) error {
	b.SetBytes(ArchiveVolumeSize)
	for b.Loop() {
		b.StopTimer()
		dst, err := a.pool.Device("restore", ArchiveVolumeSize)
		if err != nil {
			return err
		}
		b.StartTimer()
		if _, err := a.repo.Restore(context.Background(), a.full.ID, dst, archive.RestoreOptions{}); err != nil {
			return err
		}
		b.StopTimer()
		dst.Close()
		b.StartTimer()
	}
	return nil
}

// lazyReads is the number of 4 KiB reads in one lazy-cold or lazy-warm
// iteration, so that -benchtime 1x still gives percentiles.
const lazyReads = 1000

// benchLazy reads 4 KiB at random offsets. Cold: every read is the first
// of its block in a fresh image (the image is reopened, untimed, when every
// data block has been read). Warm: the cache holds the whole volume,
// loaded before timing.
func (a *archiveBench) benchLazy(b *testing.B, warm bool) error {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 7))
	var data []int
	for i, h := range a.full.Blocks {
		if !h.IsZero() {
			data = append(data, i)
		}
	}
	// The cache is a file beside the benchmark's devices, large enough for
	// the whole volume.
	open := func() (*archive.Image, error) {
		return archive.OpenLazy(ctx, a.repo, a.full.ID, archive.LazyOptions{CacheDir: a.cacheDir,
			CacheSize: ArchiveVolumeSize, Prefetch: -1})
	}
	b.StopTimer()
	im, err := open()
	if err != nil {
		return err
	}
	defer func() { im.Close() }()
	buf := make([]byte, 4096)
	bs := int64(a.repo.BlockSize())
	if warm {
		for _, i := range data {
			if _, err := im.ReadAt(buf, int64(i)*bs); err != nil {
				return err
			}
		}
	}
	var h Hist
	order := rng.Perm(len(data))
	next := 0
	for i := 0; i < b.N*lazyReads; i++ {
		var off int64
		if warm {
			off = rng.Int64N(ArchiveVolumeSize/4096) * 4096
		} else {
			if next == len(order) {
				im.Close()
				if im, err = open(); err != nil {
					return err
				}
				next = 0
			}
			off = int64(data[order[next]])*bs + rng.Int64N(bs/4096)*4096
			next++
		}
		b.StartTimer()
		t0 := time.Now()
		_, err := im.ReadAt(buf, off)
		h.Record(time.Since(t0))
		b.StopTimer()
		if err != nil {
			return err
		}
	}
	b.ReportMetric(float64(h.Percentile(0.5).Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(h.Percentile(0.99).Nanoseconds()), "p99-ns")
	return nil
}
