package bench

import (
	"fmt"
	"os"
	"testing"

	"github.com/blocksnap/blocksnap/snapshot/metascale"
)

// BenchmarkMetadataScale fills the store's paged metadata with N chunk
// versions (one snapshot's worth of origin-write copies, chunk order
// random or sequential) on a data-less device and reports heap in use per
// version and in total (after GC, beyond the baseline; the node cache is
// 64 MiB), metadata bytes on disk per version, the worst single version's
// metadata time (worst-put: what an origin write would wait) beside its
// 99th and 99.9th percentiles and the count of versions over 10 ms (so a
// single scheduler hiccup on a loaded machine is told apart from a
// systematic stall), the worst commit (run in the background) and the
// longest a commit held the writer's lock (worst-freeze), the bytes
// commits wrote per version, and Open after a clean Close and after a
// crash. One iteration is the whole run: use -benchtime=1x. N = 100M runs
// only with BLOCKSNAP_BENCH_100M=1.
func BenchmarkMetadataScale(b *testing.B) {
	sizes := []uint64{1_000_000, 10_000_000}
	if os.Getenv("BLOCKSNAP_BENCH_100M") == "1" {
		sizes = append(sizes, 100_000_000)
	}
	for _, n := range sizes {
		for _, order := range []string{"random", "sequential"} {
			b.Run(fmt.Sprintf("versions=%s/order=%s", countName(n), order), func(b *testing.B) {
				metadataScale(b, n, order == "random")
			})
		}
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
		pool, err := NewPool(env)
		if err != nil {
			b.Fatal(err)
		}
		dev, err := pool.Device("metadata", metascale.PageBytes(cfg))
		if err != nil {
			b.Fatal(err)
		}
		res, err := metascale.Run(dev, cfg)
		if cerr := pool.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			b.Fatal(err)
		}
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
