package clone

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// benchSize is the source size of the hydration benchmarks: 256 MiB, or
// BLOCKSNAP_BENCH_MB.
func benchSize(b *testing.B) int64 {
	if s := os.Getenv("BLOCKSNAP_BENCH_MB"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			b.Fatal(err)
		}
		return int64(v) << 20
	}
	return 256 << 20
}

// throttled is the slow source of the Throttled benchmarks: 1 ms per read
// and 256 MB/s, a remote image.
var throttled = blockdevtest.DelayOptions{ReadLatency: time.Millisecond, BytesPerSecond: 256 << 20}

// BenchmarkCloneHydrate compares a plain copy loop (1 MiB reads and writes,
// then a Flush) with the clone's background hydration until done (then a
// Flush), from a file source to a file destination, in MB/s. mode=clone
// also reports a foreground reader's random 4 KiB read latencies (one read
// per millisecond) during hydration (p50-ns, p99-ns) and once hydrated
// (idle-p50-ns, idle-p99-ns).
func BenchmarkCloneHydrate(b *testing.B) {
	for _, mode := range []string{"copy", "clone"} {
		b.Run("mode="+mode, func(b *testing.B) { benchHydrate(b, mode, nil) })
	}
}

// BenchmarkCloneHydrateThrottled is BenchmarkCloneHydrate with the source
// behind blockdevtest.Delayed (1 ms per read, 256 MB/s).
func BenchmarkCloneHydrateThrottled(b *testing.B) {
	for _, mode := range []string{"copy", "clone"} {
		b.Run("mode="+mode, func(b *testing.B) { benchHydrate(b, mode, &throttled) })
	}
}

func benchHydrate(b *testing.B, mode string, delay *blockdevtest.DelayOptions) {
	size := benchSize(b)
	dir := b.TempDir()
	src := benchFile(b, filepath.Join(dir, "src"), size)
	buf := blockdev.AlignedBuffer(1 << 20)
	rng := rand.New(rand.NewPCG(1, 2))
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			x := rng.Uint64() | 1
			for k := range 8 {
				buf[i+k] = byte(x >> (8 * k))
			}
		}
		if _, err := src.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	var source blockdev.Device = src
	if delay != nil {
		source = blockdevtest.NewDelayed(src, *delay)
	}
	var busy, idle []time.Duration
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		dst := benchFile(b, filepath.Join(dir, "dst"), size)
		meta := benchFile(b, filepath.Join(dir, "meta"), MetadataSize(size, 0))
		b.StartTimer()
		if mode == "copy" {
			benchCopy(b, source, dst, buf)
		} else {
			busy, idle = benchClone(b, source, dst, meta, busy, idle)
		}
		b.StopTimer()
		_ = dst.Close()
		_ = meta.Close()
		b.StartTimer()
	}
	if len(busy) > 0 {
		b.ReportMetric(float64(pct(busy, 0.50)), "p50-ns")
		b.ReportMetric(float64(pct(busy, 0.99)), "p99-ns")
		b.ReportMetric(float64(pct(idle, 0.50)), "idle-p50-ns")
		b.ReportMetric(float64(pct(idle, 0.99)), "idle-p99-ns")
	}
}

func benchFile(b *testing.B, path string, size int64) *blockdev.File {
	f, err := blockdev.Create(path, size, blockdev.FileOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.Close() })
	return f
}

func benchCopy(b *testing.B, src, dst blockdev.Device, buf []byte) {
	for off := int64(0); off < src.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), src.Size()-off)
		if _, err := src.ReadAt(buf[:n], off); err != nil {
			b.Fatal(err)
		}
		if _, err := dst.WriteAt(buf[:n], off); err != nil {
			b.Fatal(err)
		}
	}
	if err := dst.Flush(); err != nil {
		b.Fatal(err)
	}
}

// benchClone hydrates with a foreground reader running, then measures the
// same reader against the hydrated clone (untimed).
func benchClone(b *testing.B, src, dst, meta blockdev.Device, busy, idle []time.Duration) ([]time.Duration, []time.Duration) {
	c, err := Create(src, dst, meta, Options{})
	if err != nil {
		b.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var lat []time.Duration
	wg.Add(1)
	go func() {
		defer wg.Done()
		lat = foreground(c, stop)
	}()
	err = c.Wait(context.Background())
	if err == nil {
		err = c.Flush()
	}
	b.StopTimer()
	close(stop)
	wg.Wait()
	if err != nil {
		b.Fatal(err)
	}
	busy = append(busy, lat...)
	done := make(chan struct{})
	time.AfterFunc(200*time.Millisecond, func() { close(done) })
	idle = append(idle, foreground(c, done)...)
	if err := c.Close(); err != nil {
		b.Fatal(err)
	}
	b.StartTimer()
	return busy, idle
}

// foreground reads a random 4 KiB block every millisecond until stop.
func foreground(c *Clone, stop <-chan struct{}) []time.Duration {
	buf := blockdev.AlignedBuffer(4096)
	rng := rand.New(rand.NewPCG(5, 5))
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var lat []time.Duration
	for {
		select {
		case <-stop:
			return lat
		case <-tick.C:
		}
		t0 := time.Now()
		if _, err := c.ReadAt(buf, rng.Int64N(c.Size()/4096)*4096); err != nil {
			return lat
		}
		lat = append(lat, time.Since(t0))
	}
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}
