package snapshot

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Benchmarks only this package can measure well (the cross-engine ones live
// in bench/): delete time for a snapshot owning 1M chunks, metadata bytes
// per mapped chunk, and the hot paths on Mem devices (the engine's own
// cost, no device latency).

// BenchmarkDelete1M deletes a snapshot owning 2^20 chunks (2^20 index
// entries, built directly: 4 KiB chunks, random first writes on a sparse
// origin) and waits for the background collector to reclaim them all.
func BenchmarkDelete1M(b *testing.B) {
	const n, cs = 1 << 20, 4096
	for range b.N {
		b.StopTimer()
		origin, _ := blockdev.NewMem(2*n*cs, 4096)
		store, _ := blockdev.NewMem(2*n*cs, 4096)
		s, err := Format(origin, store, Options{ChunkSize: cs, JournalSize: 64 << 20})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.CreateSnapshot("big", s.Origin()); err != nil {
			b.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		perm := rng.Perm(2 * n)[:n]
		s.mu.Lock()
		for i, c := range perm {
			o := op{kind: opPut, b: 0, e: 1, c: uint64(c), n: 1, loc: uint64(i)}
			if err := s.applyOp(&o, 0, true); err != nil {
				b.Fatal(err)
			}
		}
		s.mu.Unlock()
		b.StartTimer()
		start := time.Now()
		d, err := s.Delete("big")
		if err != nil {
			b.Fatal(err)
		}
		if err := d.Wait(context.Background()); err != nil {
			b.Fatal(err)
		}
		el := time.Since(start)
		b.StopTimer()
		p := d.Progress()
		if p.Entries != n || p.BytesReclaimed != n*cs {
			b.Fatalf("progress %+v", p)
		}
		b.ReportMetric(el.Seconds(), "s/delete")
		b.ReportMetric(float64(n)/el.Seconds(), "entries/s")
		_ = s.Close()
		b.StartTimer()
	}
}

// BenchmarkMetadataPerChunk writes every chunk of a 256 MiB origin once
// after a snapshot (4 KiB chunks), in order or at random, and reports the
// metadata region's bytes in use per mapped chunk (B/chunk: index pages
// and space maps).
func BenchmarkMetadataPerChunk(b *testing.B) {
	for _, order := range []string{"sequential", "random"} {
		b.Run("order="+order, func(b *testing.B) {
			const size, cs = 256 << 20, 4096
			for range b.N {
				origin, _ := blockdev.NewMem(size, 4096)
				store, _ := blockdev.NewMem(2*size, 4096)
				s, err := Format(origin, store, Options{ChunkSize: cs, Transient: true})
				if err != nil {
					b.Fatal(err)
				}
				o := s.Origin()
				if _, err := s.CreateSnapshot("s", o); err != nil {
					b.Fatal(err)
				}
				chunks := size / cs
				idx := make([]int, chunks)
				for i := range idx {
					idx[i] = i
				}
				if order == "random" {
					rand.New(rand.NewPCG(3, 4)).Shuffle(chunks, func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
				}
				buf := make([]byte, cs)
				for _, c := range idx {
					if _, err := o.WriteAt(buf, int64(c)*cs); err != nil {
						b.Fatal(err)
					}
				}
				st := s.Stats()
				b.ReportMetric(float64(st.MetadataBytes)/float64(st.IndexEntries), "B/chunk")
				_ = s.Close()
			}
		})
	}
}

func benchStore(b *testing.B, size int64, opts Options) *Store {
	origin, _ := blockdev.NewMem(size, 4096)
	store, _ := blockdev.NewMem(4*size, 4096)
	s, err := Format(origin, store, opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

// BenchmarkStoreOriginFirstWrite: every 4 KiB chunk of 64 MiB written once
// at random after N snapshots (each write copies its chunk).
func BenchmarkStoreOriginFirstWrite(b *testing.B) {
	for _, n := range []int{1, 1024} {
		b.Run(fmt.Sprintf("snaps=%d", n), func(b *testing.B) {
			const size, cs = 64 << 20, 4096
			s := benchStore(b, size, Options{ChunkSize: cs, CommitInterval: -1})
			o := s.Origin()
			for i := range n {
				if _, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), o); err != nil {
					b.Fatal(err)
				}
			}
			perm := rand.New(rand.NewPCG(5, 6)).Perm(size / cs)
			buf := make([]byte, cs)
			b.SetBytes(cs)
			b.ReportAllocs()
			b.ResetTimer()
			var rounds []string
			for i := range b.N {
				if i > 0 && i%len(perm) == 0 { // every chunk copied: start a new round
					b.StopTimer()
					rounds = append(rounds, fmt.Sprintf("r%d", i))
					if _, err := s.CreateSnapshot(rounds[len(rounds)-1], o); err != nil {
						b.Fatal(err)
					}
					if len(rounds) > 2 { // keep the store from filling
						d, err := s.Delete(rounds[0])
						if err != nil {
							b.Fatal(err)
						}
						if err := d.Wait(context.Background()); err != nil {
							b.Fatal(err)
						}
						rounds = rounds[1:]
					}
					b.StartTimer()
				}
				if _, err := o.WriteAt(buf, int64(perm[i%len(perm)])*cs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStoreOriginOverwrite: random 4 KiB overwrites of chunks already
// copied for every snapshot (the steady state), against the raw device.
func BenchmarkStoreOriginOverwrite(b *testing.B) {
	for _, n := range []int{-1, 1024} {
		name := fmt.Sprintf("snaps=%d", n)
		if n < 0 {
			name = "raw"
		}
		b.Run(name, func(b *testing.B) {
			const size, cs = 64 << 20, 4096
			s := benchStore(b, size, Options{ChunkSize: cs, Transient: true})
			var dev blockdev.Device = s.Origin()
			if n < 0 {
				dev = s.origin
			}
			for i := range max(n, 0) {
				if _, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), s.Origin()); err != nil {
					b.Fatal(err)
				}
			}
			buf := make([]byte, 1<<20)
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := dev.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			rng := rand.New(rand.NewPCG(7, 8))
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := dev.WriteAt(buf[:4096], rng.Int64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStoreSnapshotRead: random 4 KiB reads of the oldest of N
// snapshots, every chunk changed since.
func BenchmarkStoreSnapshotRead(b *testing.B) {
	for _, n := range []int{1, 1024} {
		b.Run(fmt.Sprintf("snaps=%d", n), func(b *testing.B) {
			const size, cs = 64 << 20, 4096
			s := benchStore(b, size, Options{ChunkSize: cs, Transient: true})
			o := s.Origin()
			oldest, err := s.CreateSnapshot("s0", o)
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			for i := 1; i < n; i++ {
				if _, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), o); err != nil {
					b.Fatal(err)
				}
			}
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := o.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			rng := rand.New(rand.NewPCG(9, 10))
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := oldest.ReadAt(buf[:4096], rng.Int64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStoreCloneRead: random 4 KiB reads of a clone D levels deep
// whose data was written only at the origin (every level is resolved).
func BenchmarkStoreCloneRead(b *testing.B) {
	for _, depth := range []int{1, 100} {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			const size, cs = 64 << 20, 4096
			s := benchStore(b, size, Options{ChunkSize: cs, Transient: true})
			v := s.Origin()
			for d := range depth {
				c, err := s.CreateClone(fmt.Sprintf("c%d", d), v)
				if err != nil {
					b.Fatal(err)
				}
				v = c
			}
			rng := rand.New(rand.NewPCG(11, 12))
			buf := make([]byte, 4096)
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := v.ReadAt(buf, rng.Int64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
