package meta

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func benchMeta(b *testing.B, pages uint64) *Meta {
	dev, err := blockdev.NewMem(int64(pages)*PageSize, 4096)
	if err != nil {
		b.Fatal(err)
	}
	m, err := Format(dev, Options{DataChunks: 1 << 24})
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// BenchmarkPut: random single-chunk puts (each a new run), committed
// every 64K.
func BenchmarkPut(b *testing.B) {
	m := benchMeta(b, 1<<16)
	rng := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if err := m.Put(Key{C: rng.Uint64N(1 << 40), E: 1}, uint64(i)); err != nil {
			b.Fatal(err)
		}
		if i%65536 == 65535 {
			if err := m.Commit(); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// benchTree is a layer on a device of pages pages holding 200K random
// keys, committed, and the random source that made them.
func benchTree(b *testing.B, pages uint64) (*Meta, *rand.Rand) {
	m := benchMeta(b, pages)
	rng := rand.New(rand.NewPCG(1, 1))
	for i := range 200_000 {
		if err := m.Put(Key{C: rng.Uint64N(1 << 40), E: 1}, uint64(i)); err != nil {
			b.Fatal(err)
		}
	}
	if err := m.Commit(); err != nil {
		b.Fatal(err)
	}
	return m, rng
}

// BenchmarkSeek: lookups in a committed tree of 200K random keys through a
// View.
func BenchmarkSeek(b *testing.B) {
	m, rng := benchTree(b, 1<<15)
	v := m.View()
	defer v.Release()
	b.ReportAllocs()
	for b.Loop() {
		if _, _, _, err := v.Seek(Key{C: rng.Uint64N(1 << 40), E: 1}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPutCopyOnWrite: the store's copy-on-write pattern, which its
// OriginFirstWrite benchmark drives: every chunk of a 64 MiB region of 4
// KiB chunks (16384) preserved once at epoch 1, in a random order, each
// at the next data chunk (PutData). A fresh layer per 16384 puts; no
// commit, as between the store's tree commits.
func BenchmarkPutCopyOnWrite(b *testing.B) {
	const chunks = 16384
	perm := rand.New(rand.NewPCG(1, 2)).Perm(chunks)
	var m *Meta
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%chunks == 0 {
			b.StopTimer()
			if m != nil {
				_ = m.Close()
			}
			m = benchMeta(b, 1<<12)
			b.StartTimer()
		}
		if _, err := m.PutData(Key{C: uint64(perm[i%chunks]), E: 1}); err != nil {
			b.Fatal(err)
		}
	}
	_ = m.Close()
}

// BenchmarkSeekNoReadParallel: the store's read path into the layer,
// SeekNoRead of the open transaction, from GOMAXPROCS goroutines at once
// on a cached tree of 200K random keys (run with -cpu 1,2,4,...).
// What it shows is how lookups on many cores contend: every lookup's
// shared locks and counters are cache lines all cores write.
func BenchmarkSeekNoReadParallel(b *testing.B) {
	m, _ := benchTree(b, 1<<16)
	b.ReportAllocs()
	b.ResetTimer()
	var seed uint64
	var seedMu sync.Mutex
	b.RunParallel(func(pb *testing.PB) {
		seedMu.Lock()
		seed++
		rng := rand.New(rand.NewPCG(seed, 3))
		seedMu.Unlock()
		for pb.Next() {
			q := Key{C: rng.Uint64N(1 << 40), E: 1}
			_, _, _, err := m.SeekNoRead(q)
			if err != nil { // as the store does: read the page, then look up again
				var nc *NotCachedError
				if errors.As(err, &nc) {
					if err = m.Load(nc.Key); err == nil {
						_, _, _, err = m.SeekNoRead(q)
					}
				}
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkCommitFile: the commit of 16,384 random puts (each a leaf of
// its own, mostly) on a file: the pages a commit writes, and how many
// write calls they take, on a device where each call is a system call.
// Only the commits are timed.
func BenchmarkCommitFile(b *testing.B) {
	dev, err := blockdev.Create(filepath.Join(b.TempDir(), "meta"), 1<<16*PageSize, blockdev.FileOptions{})
	if err != nil {
		b.Fatal(err)
	}
	m, err := Format(dev, Options{DataChunks: 1 << 24})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		for j := range 16384 {
			if err := m.Put(Key{C: rng.Uint64N(1 << 40), E: 1}, uint64(i*16384+j)); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		if err := m.Commit(); err != nil {
			b.Fatal(err)
		}
	}
}

// fragmentedChunks is the data map of fragmentedMap: 1024 bitmap pages.
const fragmentedChunks = 1024 * bitsPerPage

// fragmentedMap is a closed layer whose data map has fragmentedChunks
// chunks, every other one in use, so every bitmap page is partly used.
func fragmentedMap(b *testing.B) *blockdev.Mem {
	dev, err := blockdev.NewMem(8192*PageSize, 4096)
	if err != nil {
		b.Fatal(err)
	}
	m, err := Format(dev, Options{DataChunks: fragmentedChunks, SyncWriteBack: true})
	if err != nil {
		b.Fatal(err)
	}
	for i := uint64(0); i < fragmentedChunks; i += 2 {
		if err := m.MarkData(i); err != nil {
			b.Fatal(err)
		}
	}
	if err := m.Commit(); err != nil {
		b.Fatal(err)
	}
	if err := m.Close(); err != nil {
		b.Fatal(err)
	}
	return dev
}

// BenchmarkFragmentedDataMap: a data map of 1024 bitmap pages (33M
// chunks, 4 MiB of bits) with every other chunk in use, so every page is
// partly used, opened with the whole map in memory and with a limit of 64
// pages (256 KiB), the latter also on a device whose reads take 100 µs.
// Each op frees a random chunk in use and allocates one; a commit every
// 256 ops. It reports the map's memory after Open and its peak over the
// ops, the pages read back per op, and Open's time.
func BenchmarkFragmentedDataMap(b *testing.B) {
	img := fragmentedMap(b) // each case opens a copy
	for _, c := range []struct {
		name    string
		bytes   int
		latency time.Duration // added to every read: a device whose reads take that long
	}{{"limit=whole", 8 << 20, 0}, {"limit=256KiB", 256 << 10, 0}, {"limit=256KiB/read=100µs", 256 << 10, 100 * time.Microsecond}} {
		b.Run(c.name, func(b *testing.B) {
			var dev blockdev.Device = img.Clone()
			if c.latency > 0 {
				dev = blockdevtest.NewDelayed(dev, blockdevtest.DelayOptions{ReadLatency: c.latency})
			}
			t0 := time.Now()
			m, err := Open(dev, Options{MapBytes: c.bytes, SyncWriteBack: true})
			if err != nil {
				b.Fatal(err)
			}
			open := time.Since(t0)
			defer m.Close()
			opened := m.Space().MapBytes
			peak, reads0 := opened, m.Space().MapReads
			rng := rand.New(rand.NewPCG(1, 3))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				loc := 2 * rng.Uint64N(fragmentedChunks/2)
				for {
					if err := m.FreeData(loc); err == nil {
						break
					} else if !errors.Is(err, ErrInvalid) {
						b.Fatal(err)
					}
					loc = (loc + 1) % fragmentedChunks // freed already: the next
				}
				if _, err := m.AllocData(); err != nil {
					b.Fatal(err)
				}
				if i%256 == 255 {
					peak = max(peak, m.Space().MapBytes)
					if err := m.Commit(); err != nil {
						b.Fatal(err)
					}
				}
			}
			sp := m.Space()
			b.ReportMetric(float64(opened)/(1<<20), "open-map-MiB")
			b.ReportMetric(float64(max(peak, sp.MapBytes))/(1<<20), "peak-map-MiB")
			b.ReportMetric(float64(sp.MapReads-reads0)/float64(b.N), "reads/op")
			b.ReportMetric(float64(open.Microseconds())/1000, "open-ms")
		})
	}
}

// BenchmarkMapReadAhead: a delete's batch of 32 or 64 frees of random
// chunks on the fragmented map of BenchmarkFragmentedDataMap, limited to
// 64 pages (ReadMapAhead reads 32 at most), on a device whose reads take
// 100 µs, without and with ReadMapAhead of the batch first (as
// Store.collect does); a commit after each batch. It reports the pages
// read with the layer's lock held per batch, and each batch's time.
func BenchmarkMapReadAhead(b *testing.B) {
	mem := fragmentedMap(b)
	for _, c := range []struct {
		batch int
		ahead bool
	}{{32, false}, {32, true}, {64, false}, {64, true}} {
		ahead := c.ahead
		b.Run(fmt.Sprintf("batch=%d/readahead=%v", c.batch, ahead), func(b *testing.B) {
			dev := blockdevtest.NewDelayed(mem.Clone(), blockdevtest.DelayOptions{ReadLatency: 100 * time.Microsecond})
			m, err := Open(dev, Options{MapBytes: 256 << 10, SyncWriteBack: true})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			perm := rand.New(rand.NewPCG(1, 4)).Perm(fragmentedChunks / 2) // the chunks in use, halved
			batch := make([]uint64, c.batch)
			m.ResetStalls()
			for i := 0; b.Loop(); i++ {
				for k := range batch {
					batch[k] = 2 * uint64(perm[(i*len(batch)+k)%len(perm)])
				}
				if ahead {
					m.ReadMapAhead(batch)
				}
				for _, loc := range batch {
					if err := m.FreeData(loc); err != nil && !errors.Is(err, ErrInvalid) {
						b.Fatal(err)
					}
				}
				if err := m.Commit(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(m.Stalls().LockedReads)/float64(b.N), "locked-reads/batch")
		})
	}
}
