package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/metascale"
)

// BenchmarkMetadataScale fills a whole store with N chunk versions: one
// snapshot of the origin, then every origin chunk written once (4 KiB
// writes in a pseudo-random order, or 256 KiB writes in order), so each
// write copies one chunk. The origin and the data region are data-less
// (blockdevtest.Null); the superblock, journal and metadata are a file.
// It reports heap in use after the fill (after GC, beyond the baseline
// before Format) per version and in total, and beyond the metadata cache
// (heap-over-cache-MiB: the heap less the 64 MiB MetadataCache; the
// origin buffer's 32 MiB, Options.OriginBuffer, is a buffer of its own,
// not part of the cache, and is counted in that figure, not subtracted:
// the bound of the cache plus 64 MiB holds the origin buffer
// within the 64 MiB; docs/metadata.md section 22 says what the rest is)
// and the live objects' bytes (heap-live-MiB, HeapAlloc: what heap-MiB
// is beyond them is the allocator's free slots in spans in use), and of
// them the space maps' bits (spacemap-MiB, Stats.SpaceMapMemory); metadata
// bytes on disk per version after a tree commit; the origin writes' worst,
// 99th and 99.9th percentile times and the count over 10 ms (the writer's
// stalls: a count of 1 is a scheduler hiccup on a loaded machine, many a
// systematic stall), and the store device's slowest flush during the fill
// (worst-flush-ms: a device stall, which a write waiting for a commit
// shares); and Open after a power cut (the journal's tail since
// the last tree commit replayed) and after Close. One iteration is the
// whole run: use -benchtime=1x. N = 100M runs only with
// BLOCKSNAP_BENCH_100M=1; BLOCKSNAP_BENCH_HEAPPROFILE=DIR writes a heap
// profile of each run after its fill to DIR. BLOCKSNAP_BENCH_SCALE_WRITERS=K
// fills the random order with K goroutines (default 1), each writing its
// own part of the random order (disjoint chunks, each chunk once, single
// 4 KiB writes through the origin's WriteAt): the "writers" metric says
// how many wrote, and the write times are each writer's own, so with K > 1
// they include waiting for the others.
func BenchmarkMetadataScale(b *testing.B) {
	for _, n := range scaleSizes() {
		for _, order := range []string{"random", "sequential"} {
			b.Run(fmt.Sprintf("versions=%s/order=%s", countName(n), order), func(b *testing.B) {
				storeScale(b, n, order == "random")
			})
		}
	}
}

// BenchmarkMetadataLayerScale is BenchmarkMetadataScale on the metadata
// layer alone (snapshot/internal/meta, no store above it): the same
// versions put straight into the layer, with a background committer every
// 65,536, so that the tree's own costs are told apart from the store's.
// It reports the layer's heap (its 64 MiB node cache included), metadata
// bytes on disk, the worst single version's metadata time (worst-put)
// beside its percentiles, the worst commit and the longest a commit held
// the writer's lock (worst-freeze), the bytes commits wrote per version,
// and Open after a clean Close and after a crash.
func BenchmarkMetadataLayerScale(b *testing.B) {
	for _, n := range scaleSizes() {
		for _, order := range []string{"random", "sequential"} {
			b.Run(fmt.Sprintf("versions=%s/order=%s", countName(n), order), func(b *testing.B) {
				metadataScale(b, n, order == "random")
			})
		}
	}
}

func scaleSizes() []uint64 {
	sizes := []uint64{1_000_000, 10_000_000}
	if os.Getenv("BLOCKSNAP_BENCH_100M") == "1" {
		sizes = append(sizes, 100_000_000)
	}
	return sizes
}

func storeScale(b *testing.B, n uint64, random bool) {
	cfg := metascale.StoreConfig{Versions: n, Random: random}
	if v := os.Getenv("BLOCKSNAP_BENCH_SCALE_WRITERS"); v != "" {
		k, err := strconv.Atoi(v)
		if err != nil || k < 1 {
			b.Fatalf("BLOCKSNAP_BENCH_SCALE_WRITERS=%q: want a count of at least 1", v)
		}
		cfg.Writers = k
	}
	if dir := os.Getenv("BLOCKSNAP_BENCH_HEAPPROFILE"); dir != "" {
		cfg.HeapProfile = filepath.Join(dir, strings.ReplaceAll(b.Name(), "/", "_")+".heap")
	}
	if testing.Verbose() {
		// Straight to stderr: b.Logf's lines come out only once the run ends.
		name := b.Name()
		cfg.Progress = func(done uint64, elapsed time.Duration) {
			fmt.Fprintf(os.Stderr, "%s: %d of %d versions in %v (%.0f/s)\n",
				name, done, n, elapsed.Round(time.Second), float64(done)/elapsed.Seconds())
		}
	}
	for range b.N {
		var res metascale.StoreResult
		rs := NewRuntimeStalls()
		steal := StartSteal(100 * time.Millisecond)
		onScaleDevice(b, "store-head", metascale.StoreHeadBytes(cfg), func(dev blockdev.Device) (err error) {
			res, err = metascale.RunStore(dev, cfg)
			return err
		})
		gc, sched := rs.Since()
		stolen, burst := steal.Stop()
		b.ReportMetric(float64(res.HeapInuse)/float64(res.Entries), "heap-B/version")
		b.ReportMetric(float64(res.HeapInuse)/(1<<20), "heap-MiB")
		b.ReportMetric(float64(int64(res.HeapInuse)-res.Cache)/(1<<20), "heap-over-cache-MiB")
		b.ReportMetric(float64(res.HeapLive)/(1<<20), "heap-live-MiB")
		b.ReportMetric(float64(res.SpaceMaps)/(1<<20), "spacemap-MiB")
		b.ReportMetric(float64(res.MetaBytes)/float64(res.Entries), "disk-B/version")
		b.ReportMetric(float64(res.Entries)/res.Fill.Seconds(), "versions/s")
		b.ReportMetric(float64(res.WorstWrite.Microseconds())/1000, "worst-write-ms")
		b.ReportMetric(float64(res.WorstFlush.Microseconds())/1000, "worst-flush-ms")
		b.ReportMetric(float64(res.P99Write.Microseconds()), "p99-write-µs")
		b.ReportMetric(float64(res.P999Write.Microseconds()), "p999-write-µs")
		b.ReportMetric(float64(res.Over), "writes>10ms")
		b.ReportMetric(float64(res.Writers), "writers")
		b.ReportMetric(float64(res.OpenClean.Microseconds())/1000, "open-clean-ms")
		b.ReportMetric(float64(res.OpenCrash.Microseconds())/1000, "open-crash-ms")
		// What the worst stall can be made of (as AdminUnderLoad reports
		// it): the longest hold of a lock the writer needs, the longest
		// wait for one, the writes that waited for a tree commit, and the
		// longest GC pause and scheduling latency of the whole run.
		ls := res.Locks
		b.ReportMetric(ms(max(ls.Store.MaxHold, ls.Store.MaxShared, ls.Meta.MaxHold, ls.Meta.MaxShared)), "hold-ms")
		b.ReportMetric(ms(max(ls.Store.MaxWait, ls.Meta.MaxWait)), "wait-ms")
		b.ReportMetric(float64(res.CommitWaits), "commit-waits")
		b.ReportMetric(float64(ls.Throttled), "throttled")
		b.ReportMetric(ms(gc), "gc-ms")
		b.ReportMetric(ms(sched), "sched-ms")
		// The hypervisor's (StealSampler): all CPUs' steal during the run,
		// and the most of one CPU in 100 ms.
		b.ReportMetric(ms(stolen), "steal-ms")
		b.ReportMetric(ms(burst), "worst-steal-ms")
		b.Logf("fill: Store.mu held %v by %s, shared %v by %s, waited %v by %s; Meta.mu held %v by %s, shared %v by %s, waited %v by %s; slowest page read %v, self write-back %v, %d index changes read pages, at most %d; %d writes waited for write-back, at most %v, and wrote %d pages of it themselves; %d writes waited for a tree commit; %d for origin-buffer room, at most %v; gc pause %v, sched latency %v",
			ls.Store.MaxHold, ls.Store.HoldBy, ls.Store.MaxShared, ls.Store.SharedBy, ls.Store.MaxWait, ls.Store.WaitBy,
			ls.Meta.MaxHold, ls.Meta.HoldBy, ls.Meta.MaxShared, ls.Meta.SharedBy, ls.Meta.MaxWait, ls.Meta.WaitBy,
			ls.MaxPageRead, ls.MaxSelfWrite, ls.ChangesMissed, ls.MaxChangeMiss, ls.Throttled, ls.MaxThrottle, ls.WriteBackHelped, res.CommitWaits, ls.BufferWaits, ls.MaxBufferWait, gc, sched)
	}
}

// onScaleDevice runs fn on a new device of size bytes from env's pool,
// then closes the pool; an error of either fails b.
func onScaleDevice(b *testing.B, name string, size int64, fn func(blockdev.Device) error) {
	pool, err := NewPool(env)
	if err != nil {
		b.Fatal(err)
	}
	dev, err := pool.Device(name, size)
	if err == nil {
		err = fn(dev)
	}
	if cerr := pool.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		b.Fatal(err)
	}
}

func countName(n uint64) string {
	if n%1_000_000 == 0 {
		return fmt.Sprintf("%dM", n/1_000_000)
	}
	return fmt.Sprint(n)
}

func metadataScale(b *testing.B, n uint64, random bool) {
	cfg := metascale.Config{Versions: n, Random: random}
	for range b.N {
		var res metascale.Result
		onScaleDevice(b, "metadata", metascale.PageBytes(cfg), func(dev blockdev.Device) (err error) {
			res, err = metascale.Run(dev, cfg)
			return err
		})
		b.ReportMetric(float64(res.HeapInuse)/float64(n), "heap-B/version")
		b.ReportMetric(float64(res.HeapInuse)/(1<<20), "heap-MiB")
		b.ReportMetric(float64(res.MetaBytes)/float64(n), "disk-B/version")
		b.ReportMetric(float64(res.ChunkRuns), "runs")
		b.ReportMetric(float64(n)/res.Fill.Seconds(), "versions/s")
		b.ReportMetric(float64(res.WorstPut.Microseconds()), "worst-put-µs")
		b.ReportMetric(float64(res.P99Put.Microseconds()), "p99-put-µs")
		b.ReportMetric(float64(res.P999Put.Microseconds()), "p999-put-µs")
		b.ReportMetric(float64(res.PutsOver), "puts>10ms")
		b.ReportMetric(float64(res.WorstCommit.Milliseconds()), "worst-commit-ms")
		b.ReportMetric(float64(res.WorstFreeze.Microseconds())/1000, "worst-freeze-ms")
		b.ReportMetric(float64(res.CommitPages)*4096/float64(n), "commit-B/version")
		b.ReportMetric(float64(res.OpenClean.Microseconds())/1000, "open-clean-ms")
		b.ReportMetric(float64(res.OpenCrash.Microseconds())/1000, "open-crash-ms")
	}
}
