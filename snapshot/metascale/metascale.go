// Package metascale drives the store's paged metadata layer
// (snapshot/internal/meta) at scale, for bench's BenchmarkMetadataScale:
// it fills the metadata with N chunk versions, as origin writes after a
// snapshot would, on a data-less device, and measures memory, metadata
// bytes on disk, stalls and Open time. It lives under snapshot/ because
// the layer is internal to the store; once the store sits on the layer the
// benchmark will drive the store instead.
package metascale

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// ChunkSize is the data chunk size the run pretends to copy.
const ChunkSize = 4096

// Config is one scale run.
type Config struct {
	Versions    uint64 // chunk versions to create
	Random      bool   // chunks in a pseudo-random order (else sequential)
	CacheBytes  int    // node cache (0: meta.DefaultCacheBytes)
	CommitEvery uint64 // versions per commit (0: 65536)
	CrashTail   uint64 // versions written after the last commit before the simulated crash (0: 50000)
}

// Result is what a run measured.
type Result struct {
	HeapInuse   uint64 // bytes in use after GC, beyond the baseline before the run
	MetaBytes   uint64 // metadata pages in use, in bytes
	ChunkRuns   uint64
	Fill        time.Duration // the whole fill, commits included
	WorstPut    time.Duration // the slowest single version (an origin write's metadata stall)
	P99Put      time.Duration // 99th and 99.9th percentile of a version's time (upper bucket bounds, 1.6%)
	P999Put     time.Duration
	PutsOver    uint64        // versions slower than StallLimit
	WorstCommit time.Duration // the slowest commit, run in the background
	WorstFreeze time.Duration // the longest a commit held the writer's lock
	CommitPages uint64        // pages the commits wrote
	Commits     int
	OpenClean   time.Duration // Open after Commit and Close
	OpenCrash   time.Duration // Open after a crash with uncommitted, written-back work
}

// StallLimit is the worst stall the issue allows; Result.PutsOver counts
// the versions slower than it, so one scheduler hiccup (a count of 1) is
// told apart from a systematic stall (many).
const StallLimit = 10 * time.Millisecond

// PageBytes returns the metadata region size a run of cfg needs.
func PageBytes(cfg Config) int64 {
	pages := cfg.Versions*24/meta.PageSize + 1<<15
	return int64(pages) * meta.PageSize
}

// permute is a pseudo-random permutation of [0, n) that needs no memory:
// a 4-round Feistel network over the next even power of two, walked until
// it lands below n (cycle walking keeps it a bijection).
type permute struct {
	n    uint64
	half uint
	i    uint64
	step uint64 // how far next moves: a part's walk (split)
}

func newPermute(n uint64) *permute {
	k := uint(bits.Len64(n))
	k += k % 2
	return &permute{n: n, half: k / 2, step: 1}
}

// split returns k walks that together give the permutation's elements,
// each once: walk j gives those at positions j, j+k, j+2k... So k writers
// each take one and write disjoint chunks, each in a random order.
func (q *permute) split(k int) []*permute {
	out := make([]*permute, k)
	for j := range out {
		out[j] = &permute{n: q.n, half: q.half, i: uint64(j), step: uint64(k)}
	}
	return out
}

// len is how many elements the walk gives.
func (q *permute) len() uint64 {
	if q.i >= q.n {
		return 0
	}
	return (q.n - q.i + q.step - 1) / q.step
}

func (q *permute) round(x uint64, r uint64) uint64 {
	x ^= r * 0x9e3779b97f4a7c15
	x ^= x >> 31
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 29
	return x & (1<<q.half - 1)
}

func (q *permute) encrypt(x uint64) uint64 {
	mask := uint64(1)<<q.half - 1
	l, r := x>>q.half, x&mask
	for rnd := uint64(1); rnd <= 4; rnd++ {
		l, r = r, l^q.round(r, rnd)
	}
	return l<<q.half | r
}

// next returns the permutation's next element.
func (q *permute) next() uint64 {
	y := q.encrypt(q.i)
	for y >= q.n {
		y = q.encrypt(y)
	}
	q.i += q.step
	return y
}

// Run fills a metadata region on dev (at least PageBytes(cfg) bytes) and
// measures it.
func Run(dev blockdev.Device, cfg Config) (Result, error) {
	var res Result
	if cfg.CommitEvery == 0 {
		cfg.CommitEvery = 65536
	}
	if cfg.CrashTail == 0 {
		cfg.CrashTail = 50000
	}
	chunks := cfg.Versions + cfg.CrashTail
	data, err := blockdevtest.NewNull(int64(chunks)*ChunkSize, 4096)
	if err != nil {
		return res, err
	}
	lat := new(latency) // before the baseline: it is the run's, not the metadata's
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	opts := meta.Options{DataChunks: chunks, CacheBytes: cfg.CacheBytes}
	m, err := meta.Format(dev, opts)
	if err != nil {
		return res, err
	}
	buf := make([]byte, ChunkSize)
	order := newPermute(cfg.Versions)
	put := func(i uint64) error {
		c := i
		if cfg.Random {
			c = order.next()
		}
		t0 := time.Now()
		// As the store's writers do, wait for write-back (if it is
		// behind) before the change, not inside it; the wait is part of
		// the version's time.
		if err := m.Throttle(); err != nil {
			return err
		}
		loc, err := m.PutData(meta.Key{B: 0, C: c, E: 1})
		if err != nil {
			return err
		}
		d := time.Since(t0)
		res.WorstPut = max(res.WorstPut, d)
		lat.add(d)
		// the copy of the chunk, to a device that drops it
		_, err = data.WriteAt(buf, int64(loc)*ChunkSize)
		return err
	}
	// A background committer, as the store will run one: the writer asks
	// for a commit every CommitEvery versions and does not wait for it; a
	// commit holds the writer's lock only while it freezes the
	// transaction, so WorstPut includes that stall and WorstCommit is the
	// commit's own time.
	kick := make(chan struct{}, 1)
	var commitErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range kick {
			t0 := time.Now()
			if err := m.Commit(); err != nil {
				commitErr = err
				return
			}
			res.WorstCommit = max(res.WorstCommit, time.Since(t0))
			res.Commits++
		}
	}()
	start := time.Now()
	var err2 error
	for i := uint64(0); i < cfg.Versions && err2 == nil; i++ {
		if err2 = put(i); err2 != nil {
			err2 = fmt.Errorf("metascale: version %d: %w", i, err2)
		}
		if (i+1)%cfg.CommitEvery == 0 {
			select {
			case kick <- struct{}{}:
			default: // a commit is pending already
			}
		}
	}
	close(kick)
	wg.Wait()
	if err := errors.Join(err2, commitErr); err != nil {
		return res, err
	}
	t0 := time.Now()
	if err := m.Commit(); err != nil {
		return res, err
	}
	res.WorstCommit = max(res.WorstCommit, time.Since(t0))
	res.Commits++
	res.P99Put, res.P999Put, res.PutsOver = lat.quantile(0.99), lat.quantile(0.999), lat.over(StallLimit)
	cs := m.CommitStats()
	res.WorstFreeze, res.CommitPages = cs.WorstFreeze, cs.Pages
	res.Fill = time.Since(start)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if after.HeapInuse > before.HeapInuse {
		res.HeapInuse = after.HeapInuse - before.HeapInuse
	}
	sp := m.Space()
	res.MetaBytes = sp.PagesUsed * meta.PageSize
	res.ChunkRuns = m.Stats().ChunkRuns
	if err := m.Close(); err != nil {
		return res, err
	}

	t0 = time.Now()
	m, err = meta.Open(dev, opts)
	res.OpenClean = time.Since(t0)
	if err != nil {
		return res, err
	}
	if m.Len() != cfg.Versions {
		return res, fmt.Errorf("metascale: reopened with %d keys, want %d", m.Len(), cfg.Versions)
	}
	// a crash: more versions, written back but never committed
	for i := uint64(0); i < cfg.CrashTail; i++ {
		if _, err := m.PutData(meta.Key{B: 1, C: i, E: 1}); err != nil {
			return res, err
		}
	}
	if err := m.Close(); err != nil { // Close does not commit: the tail is lost as in a crash
		return res, err
	}
	t0 = time.Now()
	m, err = meta.Open(dev, opts)
	res.OpenCrash = time.Since(t0)
	if err != nil {
		return res, err
	}
	if m.Len() != cfg.Versions {
		return res, fmt.Errorf("metascale: reopened after the crash with %d keys, want %d", m.Len(), cfg.Versions)
	}
	return res, errors.Join(m.Close(), data.Close())
}
