package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// poolBench is a 256 MiB store of 64 KiB chunks (4096 of them): a golden
// snapshot of a sparse origin (every fourth chunk data) and a clone of it
// with every other chunk written.
func poolBench(b *testing.B) (*Store, *Volume, *Volume) {
	const size, cs = 256 << 20, 64 << 10
	s := benchStore(b, size, Options{ChunkSize: cs, CommitInterval: -1})
	o := s.Origin()
	p := bytes.Repeat([]byte{1}, cs)
	for off := int64(0); off < size; off += 4 * cs {
		if _, err := o.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	g, err := s.CreateSnapshot("golden", o)
	if err != nil {
		b.Fatal(err)
	}
	c, err := s.CreateClone("c", g)
	if err != nil {
		b.Fatal(err)
	}
	return s, g, c
}

func writeHalf(b *testing.B, c *Volume) {
	p := bytes.Repeat([]byte{2}, 64<<10)
	for off := int64(0); off < c.Size(); off += 2 * int64(len(p)) {
		if _, err := c.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMapAllocation walks the whole map of the clone: what an
// nbdinfo --map or a sparse-aware copy costs, per chunk.
func BenchmarkMapAllocation(b *testing.B) {
	s, _, c := poolBench(b)
	writeHalf(b, c)
	chunks := c.Size() / s.cs
	b.ResetTimer()
	for b.Loop() {
		for off := int64(0); off < c.Size(); {
			l, _, err := c.MapAllocation(off, c.Size()-off)
			if err != nil {
				b.Fatal(err)
			}
			off += l
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(int64(b.N)*chunks), "ns/chunk")
}

// BenchmarkResetToParent resets a clone with 2048 written chunks to the
// snapshot it came from (metadata only), and reports the store chunks the
// reset wrote (0: no data moved).
func BenchmarkResetToParent(b *testing.B) {
	s, g, c := poolBench(b)
	writes := 0
	for b.Loop() {
		b.StopTimer()
		writeHalf(b, c)
		before := s.Stats().usedChunks()
		b.StartTimer()
		if err := s.Rollback(context.Background(), c, g); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := s.Checkpoint(context.Background()); err != nil {
			b.Fatal(err)
		}
		if after := s.Stats().usedChunks(); after+2048 != before {
			writes++
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(writes), "resets-that-moved-data")
}

var _ blockdev.AllocationMapper = (*Volume)(nil)
