package snapshot

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Benchmarks of the branch counters (clonecounters.go): Stat of a clone
// and of a clone snapshot by the counters and by the walk they replaced,
// the cost they add to clone writes and to an origin copy-on-write under
// clones, and what a delete's counter upkeep costs.

// clonecountBenchWrite applies, under Store.mu, the index changes of a
// whole-chunk clone write of chunk c to store chunk loc, as cloneChunk
// logs them, without the data (Mem devices are sparse).
func clonecountBenchWrite(b *testing.B, s *Store, br *branch, c, loc uint64) {
	var ops []op
	_, hasLive, err := s.ix.get(br.id, c, epochLive)
	if err != nil {
		b.Fatal(err)
	}
	prevE := uint32(0)
	if p, ok, err := s.ix.last(br.id, c); err != nil {
		b.Fatal(err)
	} else if ok {
		prevE = p.e
	}
	needAt := uint32(0)
	if h := br.need.Load(); h > prevE {
		needAt = h
	}
	switch {
	case hasLive && needAt != 0:
		ops = append(ops, op{kind: opMove, b: br.id, c: c, e: epochLive, e2: needAt})
	case hasLive:
		ops = append(ops, op{kind: opDel, b: br.id, c: c, e: epochLive, n: 1})
	case needAt != 0:
		ops = append(ops, op{kind: opPut, b: br.id, c: c, e: needAt, n: 1, loc: locInherit})
	}
	ops = append(ops, op{kind: opPut, b: br.id, c: c, e: epochLive, n: 1, loc: loc})
	if err := s.applyOps(ops, 0, true); err != nil {
		b.Fatal(err)
	}
}

// clonecountStatStore builds a store of about 1M index entries: origin
// snapshot s1 with 2^19 chunks copied, a clone c of it with 2^19 writes
// spread over n snapshots of c (c-s0 ...), and n more clones of s1.
func clonecountStatStore(b *testing.B, n int) *Store {
	const half, cs = 1 << 19, 4096
	origin, _ := blockdev.NewMem(4*half*cs, 4096)
	store, _ := blockdev.NewMem(8*half*cs, 4096)
	s, err := Format(origin, store, Options{ChunkSize: cs, JournalSize: 64 << 20, CommitInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	s1, err := s.CreateSnapshot("s1", s.Origin())
	if err != nil {
		b.Fatal(err)
	}
	c, err := s.CreateClone("c", s1)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	loc := uint64(0)
	s.mu.Lock()
	for _, ch := range rng.Perm(4 * half)[:half] {
		o := op{kind: opPut, b: 0, e: 1, c: uint64(ch), n: 1, loc: loc}
		loc++
		if err := s.applyOp(&o, 0, true); err != nil {
			b.Fatal(err)
		}
	}
	s.mu.Unlock()
	for i := range n {
		if _, err := s.CreateSnapshot(fmt.Sprintf("c-s%d", i), c); err != nil {
			b.Fatal(err)
		}
		s.mu.Lock()
		for range half / n {
			clonecountBenchWrite(b, s, c.br, uint64(rng.IntN(4*half)), loc)
			loc++
		}
		s.mu.Unlock()
	}
	for i := range n {
		if _, err := s.CreateClone(fmt.Sprintf("k%d", i), s1); err != nil {
			b.Fatal(err)
		}
	}
	return s
}

// BenchmarkCloneStat: Stat of clone c and of its middle snapshot, at about
// 1M index entries with n snapshots of c and n other clones, by the
// counters (method=counters, what Stat does) and by the walk (the code
// before them).
func BenchmarkCloneStat(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("versions=1M/n=%d", n), func(b *testing.B) {
			s := clonecountStatStore(b, n)
			b.Logf("%d index entries", s.Stats().IndexEntries)
			for _, target := range []string{"c", fmt.Sprintf("c-s%d", n/2)} {
				for _, method := range []string{"counters", "walk"} {
					name := "clone"
					if target != "c" {
						name = "clone-snapshot"
					}
					b.Run(name+"/method="+method, func(b *testing.B) {
						stat := s.Stat
						if method == "walk" {
							stat = s.statWalk
						}
						want, err := s.statWalk(target)
						if err != nil {
							b.Fatal(err)
						}
						b.ReportAllocs()
						b.ResetTimer()
						for range b.N {
							got, err := stat(target)
							if err != nil || got != want {
								b.Fatalf("%+v %v, want %+v", got, err, want)
							}
						}
					})
				}
			}
		})
	}
}

// BenchmarkStoreCloneFirstWrite: every 4 KiB chunk of a clone of a 64 MiB
// origin's snapshot written once at random (each write redirects: a put and
// its counter upkeep), with a snapshot of the clone taken per round.
func BenchmarkStoreCloneFirstWrite(b *testing.B) {
	const size, cs = 64 << 20, 4096
	s := benchStore(b, size, Options{ChunkSize: cs, CommitInterval: -1})
	s1, err := s.CreateSnapshot("s1", s.Origin())
	if err != nil {
		b.Fatal(err)
	}
	c, err := s.CreateClone("c", s1)
	if err != nil {
		b.Fatal(err)
	}
	perm := rand.New(rand.NewPCG(5, 6)).Perm(size / cs)
	buf := make([]byte, cs)
	b.SetBytes(cs)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i > 0 && i%len(perm) == 0 { // every chunk written: a snapshot, and a new round
			b.StopTimer()
			if _, err := s.CreateSnapshot(fmt.Sprintf("r%d", i), c); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		if _, err := c.WriteAt(buf, int64(perm[i%len(perm)])*cs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOriginCopyFanOut: origin first writes (each copies its chunk
// for snapshot s1) with k clones of s1 that have written every chunk of a
// 4 MiB origin before (wrote=all: each copy visits k clones and seeks
// their entries of the chunk) or nothing (wrote=none: k visits in memory).
func BenchmarkOriginCopyFanOut(b *testing.B) {
	const size, cs = 4 << 20, 4096
	for _, k := range []int{0, 1, 1000} {
		for _, wrote := range []string{"none", "all"} {
			if k == 0 && wrote == "all" {
				continue
			}
			b.Run(fmt.Sprintf("clones=%d/wrote=%s", k, wrote), func(b *testing.B) {
				origin, _ := blockdev.NewMem(size, 4096)
				store, _ := blockdev.NewMem(int64(k+4)*size*2+128<<20, 4096)
				s, err := Format(origin, store, Options{ChunkSize: cs, JournalSize: 64 << 20, CommitInterval: -1})
				if err != nil {
					b.Fatal(err)
				}
				defer func() { _ = s.Close() }()
				o := s.Origin()
				s1, err := s.CreateSnapshot("s1", o)
				if err != nil {
					b.Fatal(err)
				}
				loc := uint64(0)
				for i := range k {
					cl, err := s.CreateClone(fmt.Sprintf("k%d", i), s1)
					if err != nil {
						b.Fatal(err)
					}
					if wrote == "all" {
						s.mu.Lock()
						for ch := range uint64(size / cs) {
							clonecountBenchWrite(b, s, cl.br, ch, loc)
							loc++
						}
						s.mu.Unlock()
					}
				}
				perm := rand.New(rand.NewPCG(5, 6)).Perm(size / cs)
				buf := make([]byte, cs)
				b.SetBytes(cs)
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					if i > 0 && i%len(perm) == 0 {
						b.StopTimer()
						if _, err := s.CreateSnapshot(fmt.Sprintf("r%d", i), o); err != nil {
							b.Fatal(err)
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
}

// BenchmarkDeleteCounterUpkeep: the Delete call (record applied, counters
// kept; the collection runs after and is not timed) of the middle one of n
// snapshots of the origin or of a clone at about 1M index entries.
func BenchmarkDeleteCounterUpkeep(b *testing.B) {
	const n = 1000
	s := clonecountStatStore(b, n)
	o := s.Origin()
	for i := range n {
		if _, err := s.CreateSnapshot(fmt.Sprintf("o-s%d", i), o); err != nil {
			b.Fatal(err)
		}
		s.mu.Lock()
		for j := range 512 { // 512 copies owned by each origin snapshot
			ch := uint64(4<<19) - 1 - uint64(i*512+j)%(1<<19)
			op := op{kind: opPut, b: 0, e: s.b0.lastEpoch, c: ch, n: 1, loc: uint64(2<<20) + uint64(i*512+j)}
			if pe, err := s.preservedOf(ch); err != nil {
				b.Fatal(err)
			} else if pe >= op.e {
				continue
			}
			if err := s.applyOp(&op, 0, true); err != nil {
				b.Fatal(err)
			}
		}
		s.mu.Unlock()
	}
	b.Logf("%d index entries", s.Stats().IndexEntries)
	next := map[string]int{"o-s": n / 2, "c-s": n / 2} // the next snapshot to delete, across runs
	for _, kind := range []string{"origin", "clone"} {
		b.Run("of="+kind, func(b *testing.B) {
			prefix := "o-s"
			if kind == "clone" {
				prefix = "c-s"
			}
			var total time.Duration
			for range b.N {
				name := fmt.Sprintf("%s%d", prefix, next[prefix])
				next[prefix] += 2
				start := time.Now()
				if _, err := s.Delete(name); err != nil {
					b.Fatal(err)
				}
				total += time.Since(start)
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/delete")
		})
	}
}
