package metascale

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/internal/lockstat"
)

// StoreConfig is one scale run of the whole store.
type StoreConfig struct {
	Versions      uint64 // chunk versions to create: origin chunks written once after a snapshot
	Random        bool   // 4 KiB writes in a pseudo-random order (else 256 KiB writes in order)
	MetadataCache int64  // Options.MetadataCache (0: the default, 64 MiB)
	// Writers is how many goroutines write a random fill (0: one). Each
	// takes its own part of the random order, so they write disjoint
	// chunks, each chunk once, one 4 KiB write a chunk, through the
	// origin's WriteAt as one writer does. A sequential fill has one.
	Writers int
	// HeapProfile, if set, is a file to write a heap profile to after the
	// fill (what the heap holds at its largest).
	HeapProfile string
	// Progress, if set, is called about every ProgressEvery (default a
	// minute) during the fill with the chunk versions written so far and
	// the time since the fill began: a long fill (100M) says how far it
	// has come.
	Progress      func(done uint64, elapsed time.Duration)
	ProgressEvery time.Duration
}

// StoreResult is what a store run measured.
type StoreResult struct {
	HeapInuse uint64 // bytes in use after the fill and a GC, beyond the baseline before Format
	// HeapLive is the bytes of live objects then (HeapAlloc, beyond the
	// baseline): HeapInuse less it is the allocator's spans' free slots.
	HeapLive uint64
	Cache    int64 // the metadata cache the store was given
	// SpaceMaps is the memory the space maps' bits took after the fill
	// (Stats.SpaceMapMemory), within HeapInuse.
	SpaceMaps  int64
	Entries    int64 // index entries (chunk versions)
	MetaBytes  int64 // metadata pages in use after a tree commit
	Fill       time.Duration
	WorstWrite time.Duration // the slowest origin write: the writer's worst stall
	P99Write   time.Duration
	P999Write  time.Duration
	Over       uint64 // origin writes slower than StallLimit
	// WorstFlush is the store device's slowest flush during the fill.
	WorstFlush time.Duration
	Writers    int           // goroutines that wrote the fill
	OpenClean  time.Duration // Open after Close
	OpenCrash  time.Duration // Open after a power cut once the fill was flushed
	// What the fill's stalls were made of: the store's lock maxima over
	// the fill (the longest hold, shared span and wait of Store.mu and of
	// the metadata layer's lock, with who ended each), and the writes
	// that waited for a tree commit to keep replay bounded.
	Locks       snapshot.LockStats
	CommitWaits int64
}

// chunkSize is the store's chunk size in a store run; seqChunks the chunks
// of one sequential write.
const (
	chunkSize = 4096
	seqChunks = 64
)

// storeRegions returns the journal and metadata region sizes a run of cfg
// gives the store, and the bytes before its data region (at most).
func storeRegions(cfg StoreConfig) (journal, metadata, head int64) {
	journal = 256 << 20
	metadata = int64(cfg.Versions)*24 + 128<<20 // 12.8 B/version random, twice that between tree commits
	metadata = (metadata + chunkSize - 1) / chunkSize * chunkSize
	head = 1<<20 + journal + metadata // the superblock and identity take less than 1 MiB
	return journal, metadata, head
}

// StoreHeadBytes is the size of the device RunStore keeps the store's
// superblock, journal and metadata on.
func StoreHeadBytes(cfg StoreConfig) int64 {
	_, _, head := storeRegions(cfg)
	return head
}

// cutDevice passes calls to dev until cut is set; then every write,
// discard and flush fails without reaching it (reads still pass): a power
// cut after everything the store had flushed, with the device's contents
// left as the crash left them.
type cutDevice struct {
	blockdev.Device
	cut atomic.Bool
	// worstFlush is the slowest Flush, in nanoseconds: the device's own
	// stalls (a file's fdatasync), which a writer waiting for a commit
	// sees as its own.
	worstFlush lockstat.Max
}

var errCut = fmt.Errorf("metascale: power cut: %w", blockdev.ErrIO)

func (d *cutDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.cut.Load() {
		return 0, errCut
	}
	return d.Device.WriteAt(p, off)
}

func (d *cutDevice) Discard(off, n int64) error {
	if d.cut.Load() {
		return errCut
	}
	return d.Device.Discard(off, n)
}

func (d *cutDevice) Flush() error {
	if d.cut.Load() {
		return errCut
	}
	t0 := time.Now()
	err := d.Device.Flush()
	d.worstFlush.Note(int64(time.Since(t0)))
	return err
}

// Close leaves the device open: the run opens the store on it again.
func (d *cutDevice) Close() error { return nil }

// RunStore formats a store whose superblock, journal and metadata live on
// head (at least StoreHeadBytes(cfg) bytes; a file) and whose data region
// and origin are data-less (blockdevtest.Null), takes one snapshot of the
// origin and writes every origin chunk once, so that each write copies:
// cfg.Versions chunk versions. It measures the heap, the metadata on disk,
// each origin write's time, and Open after a power cut and after Close.
func RunStore(head blockdev.Device, cfg StoreConfig) (StoreResult, error) {
	var res StoreResult
	n := cfg.Versions
	journal, metadata, at := storeRegions(cfg)
	if head.Size() < at {
		return res, fmt.Errorf("metascale: head device of %d bytes, want %d", head.Size(), at)
	}
	origin, err := blockdevtest.NewNull(int64(n)*chunkSize, 4096)
	if err != nil {
		return res, err
	}
	data, err := blockdevtest.NewNull(int64(n+n/8)*chunkSize, 4096) // room for the copies
	if err != nil {
		return res, err
	}
	cut := &cutDevice{Device: head}
	split := &blockdevtest.Split{Head: cut, Tail: data, At: at}
	opts := snapshot.Options{ChunkSize: chunkSize, JournalSize: journal, MetadataBytes: metadata,
		MetadataCache: cfg.MetadataCache}
	res.Cache = cfg.MetadataCache
	if res.Cache == 0 {
		res.Cache = 64 << 20
	}
	writers := 1
	if cfg.Random {
		writers = max(1, cfg.Writers)
	}
	// Before the baseline: they are the run's, not the store's.
	lats := make([]latency, writers)
	worst := make([]time.Duration, writers)
	bufs := make([][]byte, writers)
	for w := range bufs {
		if cfg.Random {
			bufs[w] = make([]byte, chunkSize)
		} else {
			bufs[w] = make([]byte, seqChunks*chunkSize)
		}
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	s, err := snapshot.Format(origin, split, opts)
	if err != nil {
		return res, err
	}
	o := s.Origin()
	if _, err := s.CreateSnapshot("s", o); err != nil {
		return res, errors.Join(err, s.Close())
	}
	s.ResetLockStats() // the fill's, not Format's
	cut.worstFlush.Reset()
	// done[w] is the chunks writer w has written, for the progress line.
	done := make([]atomic.Uint64, writers)
	// write is writer w's origin write of buf at chunk c, timed.
	write := func(w int, buf []byte, c uint64) error {
		t0 := time.Now()
		_, err := o.WriteAt(buf, int64(c)*chunkSize)
		d := time.Since(t0)
		worst[w] = max(worst[w], d)
		lats[w].add(d)
		done[w].Add(uint64(len(buf) / chunkSize))
		return err
	}
	t0 := time.Now()
	stopProgress := progress(cfg, done, t0)
	if cfg.Random {
		parts := newPermute(n).split(writers)
		errs := make([]error, writers)
		var failed atomic.Bool
		var wg sync.WaitGroup
		for w, part := range parts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range part.len() {
					if failed.Load() {
						return
					}
					if err := write(w, bufs[w], part.next()); err != nil {
						errs[w] = err
						failed.Store(true)
						return
					}
				}
			}()
		}
		wg.Wait()
		err = errors.Join(errs...)
	} else {
		buf := bufs[0]
		for c := uint64(0); c < n && err == nil; c += seqChunks {
			err = write(0, buf[:min(seqChunks, n-c)*chunkSize], c)
		}
	}
	if err == nil {
		err = o.Flush()
	}
	res.Fill = time.Since(t0)
	res.WorstFlush = time.Duration(cut.worstFlush.Load())
	stopProgress()
	if err != nil {
		return res, errors.Join(fmt.Errorf("metascale: fill: %w", err), s.Close())
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	res.SpaceMaps = s.Stats().SpaceMapMemory
	if after.HeapInuse > before.HeapInuse {
		res.HeapInuse = after.HeapInuse - before.HeapInuse
	}
	if after.HeapAlloc > before.HeapAlloc {
		res.HeapLive = after.HeapAlloc - before.HeapAlloc
	}
	if cfg.HeapProfile != "" {
		if err := writeHeapProfile(cfg.HeapProfile); err != nil {
			return res, errors.Join(err, s.Close())
		}
	}
	lat := &lats[0]
	for w := 1; w < writers; w++ {
		lat.merge(&lats[w])
	}
	res.WorstWrite = slices.Max(worst)
	res.Writers = writers
	res.P99Write, res.P999Write, res.Over = lat.quantile(0.99), lat.quantile(0.999), lat.over(StallLimit)
	res.Locks = s.LockStats()
	st := s.Stats()
	res.Entries, res.CommitWaits = st.IndexEntries, st.CommitWaits

	// The power goes: what the Flush made durable is on head, and the
	// tree commits the run started since are cut short.
	cut.cut.Store(true)
	_ = s.Close() // it fails: the device is gone
	cut.cut.Store(false)
	t0 = time.Now()
	s, err = snapshot.Open(origin, split, opts)
	res.OpenCrash = time.Since(t0)
	if err != nil {
		return res, fmt.Errorf("metascale: open after the power cut: %w", err)
	}
	if got := s.Stats().IndexEntries; got != res.Entries {
		return res, errors.Join(fmt.Errorf("metascale: %d entries after the power cut, want %d", got, res.Entries), s.Close())
	}
	// A tree commit: the pages in use then count each node once (between
	// commits a shadowed node's old page is held as well).
	if err := s.Checkpoint(context.Background()); err != nil {
		return res, errors.Join(err, s.Close())
	}
	res.MetaBytes = s.Stats().MetadataBytes
	if err := s.Close(); err != nil {
		return res, err
	}
	t0 = time.Now()
	s, err = snapshot.Open(origin, split, opts)
	res.OpenClean = time.Since(t0)
	if err != nil {
		return res, fmt.Errorf("metascale: open after Close: %w", err)
	}
	return res, errors.Join(s.Close(), origin.Close(), data.Close())
}

// progress starts cfg.Progress's calls, if it is set, from the fill's
// counters in done, and returns what stops them (and waits for the last).
func progress(cfg StoreConfig, done []atomic.Uint64, t0 time.Time) (stop func()) {
	if cfg.Progress == nil {
		return func() {}
	}
	every := cfg.ProgressEvery
	if every <= 0 {
		every = time.Minute
	}
	quit, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				var n uint64
				for w := range done {
					n += done[w].Load()
				}
				cfg.Progress(n, time.Since(t0))
			}
		}
	}()
	return func() {
		close(quit)
		<-exited
	}
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = pprof.WriteHeapProfile(f)
	return errors.Join(err, f.Close())
}
