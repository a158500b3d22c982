package bench

import (
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ChunkSize is the engines' chunk size in the origin benchmarks: 4 KiB, so
// each benchmark write is one whole chunk.
const ChunkSize = 4096

// writeRegion writes every 4 KiB block of [0, RegionSize) of d once, in the
// order perm gives, with Writers goroutines.
func writeRegion(d blockdev.Device, perm []int32, seed byte) (*runner, error) {
	r := &runner{}
	err := r.run(Writers, int64(len(perm)), BlockSize, func(_ int, i int64, buf []byte) error {
		blk := int64(perm[i])
		fillPattern(buf, blk+int64(seed)<<32)
		_, err := d.WriteAt(buf, blk*BlockSize)
		return err
	})
	return r, err
}

// OriginFirstWrite: snaps snapshots, then every 4 KiB block of a 64 MiB
// region written once in random order, all first writes; MB/s. Setup is not
// timed.
func OriginFirstWrite(b *testing.B, env Env, e Engine, snaps int) {
	originWrite(b, env, e, snaps, false)
}

// OriginOverwrite: as OriginFirstWrite, but the timed pass is the second
// one over the region (steady state: every chunk already preserved).
func OriginOverwrite(b *testing.B, env Env, e Engine, snaps int) {
	originWrite(b, env, e, snaps, true)
}

func originWrite(b *testing.B, env Env, e Engine, snaps int, second bool) {
	perm := permutation(RegionSize/BlockSize, 1)
	b.SetBytes(RegionSize)
	b.ReportAllocs()
	var hist Hist
	b.StopTimer()
	for range b.N {
		s, pool, err := newSetup(env, e, RegionSize, ChunkSize, snaps)
		if err != nil {
			b.Fatal(err)
		}
		if second {
			if _, err := writeRegion(s.Origin, perm, 1); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		r, err := writeRegion(s.Origin, perm, 2)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		mergeHist(&hist, &r.hist)
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		pool.Close()
	}
	b.ReportMetric(float64(hist.Percentile(0.50).Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(hist.Percentile(0.99).Nanoseconds()), "p99-ns")
}

func mergeHist(dst, src *Hist) {
	for i := range src.counts {
		dst.counts[i].Add(src.counts[i].Load())
	}
	dst.total.Add(src.total.Load())
}

// SnapshotRead: snaps snapshots, the region overwritten after them (so the
// oldest snapshot's data lives in the store) and flushed, then random 4 KiB
// reads of the oldest snapshot: MB/s, iops, p50-ns, p99-ns. The Flush makes
// the reads steady state: without it the shared store's background
// write-out of the origin writes it buffered (up to 32 MiB) ran during the
// first tens of milliseconds of the reads, which is all of a report -quick
// run (20000 reads).
func SnapshotRead(b *testing.B, env Env, e Engine, snaps int) {
	s, pool, err := newSetup(env, e, RegionSize, ChunkSize, snaps)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	defer s.Close()
	if _, err := writeRegion(s.Origin, permutation(RegionSize/BlockSize, 1), 3); err != nil {
		b.Fatal(err)
	}
	if err := s.Origin.Flush(); err != nil {
		b.Fatal(err)
	}
	if s.Snapshot == nil {
		b.Skip("no snapshot to read")
	}
	randomIO(b, Writers, RegionSize/BlockSize, 7, func(buf []byte, blk int64) error {
		_, err := s.Snapshot.ReadAt(buf, blk*BlockSize)
		return err
	})
}

// ConcurrentWrite: 4 KiB random writes to the origin with one snapshot
// active, jobs goroutines: iops, p50-ns, p99-ns.
func ConcurrentWrite(b *testing.B, env Env, e Engine, jobs int) {
	s, pool, err := newSetup(env, e, RegionSize, ChunkSize, 1)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	defer s.Close()
	randomIO(b, jobs, RegionSize/BlockSize, 9, func(buf []byte, blk int64) error {
		fillPattern(buf, blk)
		_, err := s.Origin.WriteAt(buf, blk*BlockSize)
		return err
	})
}
