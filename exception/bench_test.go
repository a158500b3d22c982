package exception

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	benchRegion = 64 << 20
	benchChunk  = 4096
)

func benchFile(b *testing.B, name string, size int64) *blockdev.File {
	f, err := blockdev.Create(filepath.Join(b.TempDir(), name), size, blockdev.FileOptions{BlockSize: 4096})
	require.NoError(b, err)
	b.Cleanup(func() { _ = f.Close() })
	return f
}

// benchSnapshots attaches n fresh persistent snapshots, each on its own
// COW file big enough to hold the whole region.
func benchSnapshots(b *testing.B, o *Origin, cows []*blockdev.File) []*Snapshot {
	snaps := make([]*Snapshot, len(cows))
	for i, cow := range cows {
		s, err := o.CreateSnapshot(cow, Options{ChunkSize: benchChunk, Persistent: true})
		require.NoError(b, err)
		snaps[i] = s
	}
	return snaps
}

// BenchmarkOriginFirstWrite: N persistent snapshots (4 KiB chunks), then
// every 4 KiB block of a 64 MiB region written once, in random order: every
// write is a first write, which costs one copy per snapshot. Setup and the
// re-creation of snapshots when the region is used up are not timed.
func BenchmarkOriginFirstWrite(b *testing.B) {
	for _, n := range []int{0, 1, 2, 4, 8, 16} {
		b.Run(fmt.Sprintf("snaps=%d", n), func(b *testing.B) {
			o := newOrigin(b, benchFile(b, "origin", benchRegion))
			cows := make([]*blockdev.File, n)
			for i := range cows {
				cows[i] = benchFile(b, fmt.Sprintf("cow%d", i), benchRegion+benchRegion/64)
			}
			blocks := benchRegion / benchChunk
			order := rand.Perm(blocks)
			snaps := benchSnapshots(b, o, cows)
			p := blockdev.AlignedBuffer(benchChunk)
			next := 0
			b.SetBytes(benchChunk)
			b.ResetTimer()
			for range b.N {
				if next == blocks {
					b.StopTimer()
					for _, s := range snaps {
						require.NoError(b, s.Delete())
					}
					snaps = benchSnapshots(b, o, cows)
					next = 0
					b.StartTimer()
				}
				if _, err := o.WriteAt(p, int64(order[next])*benchChunk); err != nil {
					b.Fatal(err)
				}
				next++
			}
			b.StopTimer()
			require.NoError(b, o.Close())
		})
	}
}

// BenchmarkConcurrentWrite: J goroutines write random 4 KiB blocks of a
// 256 MiB origin with one persistent snapshot active (first writes copy;
// the persistent store batches their commits). Reports iops and latency
// percentiles.
func BenchmarkConcurrentWrite(b *testing.B) {
	const region = 256 << 20
	for _, jobs := range []int{1, 2, 4, 8, 16} {
		b.Run(fmt.Sprintf("jobs=%d", jobs), func(b *testing.B) {
			o := newOrigin(b, benchFile(b, "origin", region))
			cow := benchFile(b, "cow", region+region/64)
			_, err := o.CreateSnapshot(cow, Options{ChunkSize: benchChunk, Persistent: true})
			require.NoError(b, err)
			lat := make([][]time.Duration, jobs)
			per := (b.N + jobs - 1) / jobs
			for j := range lat {
				lat[j] = make([]time.Duration, 0, per)
			}
			var wg sync.WaitGroup
			errs := make(chan error, jobs)
			b.ResetTimer()
			start := time.Now()
			for j := range jobs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(j), 42))
					p := blockdev.AlignedBuffer(4096)
					for i := j; i < b.N; i += jobs {
						off := rng.Int64N(region/4096) * 4096
						t0 := time.Now()
						if _, err := o.WriteAt(p, off); err != nil {
							errs <- err
							return
						}
						lat[j] = append(lat[j], time.Since(t0))
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}
			all := slices.Concat(lat...)
			slices.Sort(all)
			if len(all) > 0 {
				b.ReportMetric(float64(len(all))/elapsed.Seconds(), "iops")
				b.ReportMetric(float64(all[len(all)/2]), "p50-ns")
				b.ReportMetric(float64(all[len(all)*99/100]), "p99-ns")
			}
			require.NoError(b, o.Close())
		})
	}
}
