package bench

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// BlockSize is the I/O size of every random-I/O benchmark.
const BlockSize = 4096

// RegionSize is the region the origin benchmarks write: 64 MiB.
const RegionSize = 64 << 20

// Writers is the number of goroutines the origin write and snapshot read
// benchmarks use, the same for every engine so that rows compare: a guest
// with a modest queue depth. ConcurrentWrite varies it.
const Writers = 8

// permutation returns the block numbers 0..n-1 in a random order fixed by
// seed, so every engine sees the same sequence.
func permutation(n int, seed uint64) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(i)
	}
	rng := rand.New(rand.NewPCG(seed, seed^0xabcdef))
	rng.Shuffle(n, func(i, j int) { p[i], p[j] = p[j], p[i] })
	return p
}

// fillPattern writes a recognisable pattern into p for block blk.
func fillPattern(p []byte, blk int64) {
	for i := 0; i+8 <= len(p); i += 8 {
		v := uint64(blk)*0x9E3779B97F4A7C15 + uint64(i)
		p[i], p[i+1], p[i+2], p[i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		p[i+4], p[i+5], p[i+6], p[i+7] = byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
}

// runner runs n operations spread over jobs goroutines, records each
// operation's latency, and reports the first error.
type runner struct {
	hist Hist
	next atomic.Int64
	err  atomic.Pointer[error]
}

// run calls op(worker, i, buf) for i in [0, n) across jobs goroutines, each
// with its own aligned buffer of bufSize bytes. Nothing is allocated per
// operation.
func (r *runner) run(jobs int, n int64, bufSize int, op func(worker int, i int64, buf []byte) error) error {
	r.next.Store(0)
	var wg sync.WaitGroup
	for w := range jobs {
		buf := blockdev.AlignedBuffer(bufSize)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := r.next.Add(1) - 1
				if i >= n || r.err.Load() != nil {
					return
				}
				start := time.Now()
				if err := op(w, i, buf); err != nil {
					e := fmt.Errorf("op %d: %w", i, err)
					r.err.CompareAndSwap(nil, &e)
					return
				}
				r.hist.Record(time.Since(start))
			}
		}()
	}
	wg.Wait()
	if e := r.err.Load(); e != nil {
		return *e
	}
	return nil
}

// reportLatency adds iops, p50-ns and p99-ns to b from the runner's
// histogram, over the elapsed time of the timed part.
func (r *runner) reportLatency(b *testing.B, ops int64, elapsed time.Duration) {
	if elapsed > 0 {
		b.ReportMetric(float64(ops)/elapsed.Seconds(), "iops")
	}
	b.ReportMetric(float64(r.hist.Percentile(0.50).Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(r.hist.Percentile(0.99).Nanoseconds()), "p99-ns")
}

// prefill writes the pattern over [0, size) of d in 1 MiB writes, so that
// copy-on-write copies real data.
func prefill(d blockdev.Device, size int64) error {
	buf := blockdev.AlignedBuffer(1 << 20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		for b := int64(0); b < n; b += BlockSize {
			fillPattern(buf[b:b+BlockSize], (off+b)/BlockSize)
		}
		if _, err := d.WriteAt(buf[:n], off); err != nil {
			return err
		}
	}
	return d.Flush()
}

// randomIO times b.N operations at random 4 KiB blocks of [0, blocks),
// spread over jobs goroutines, each with its own generator seeded from seed
// and its own buffer; it reports MB/s (b.SetBytes), iops, p50-ns and p99-ns.
// op gets the buffer and the block number. Nothing is allocated per
// operation.
func randomIO(b *testing.B, jobs int, blocks int64, seed uint64, op func(buf []byte, blk int64) error) {
	rngs := make([]*rand.Rand, jobs)
	for i := range rngs {
		rngs[i] = rand.New(rand.NewPCG(uint64(i), seed))
	}
	var r runner
	b.SetBytes(BlockSize)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	err := r.run(jobs, int64(b.N), BlockSize, func(w int, _ int64, buf []byte) error {
		return op(buf, rngs[w].Int64N(blocks))
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	r.reportLatency(b, int64(b.N), elapsed)
}
