package snapshot

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// stamp fills a chunk-sized buffer with a value derived from v.
func stamp(p []byte, v uint64) {
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], v*0x9E3779B97F4A7C15+uint64(i))
	}
}

// TestScaleSnapshots takes 10,000 snapshots of one origin, writing one chunk
// before each, and checks every snapshot (three chunks each, all of a few)
// before and after a reopen.
func TestScaleSnapshots(t *testing.T) {
	const nsnap, cs = 10000, 4096
	origin, _ := blockdev.NewMem(1<<20, 512)
	store, _ := blockdev.NewMem(64<<20, 512)
	chunks := uint64(origin.Size() / cs)
	opts := Options{ChunkSize: cs, JournalSize: 4 << 20}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	o := s.Origin()
	buf := make([]byte, cs)
	for i := uint64(1); i <= nsnap; i++ {
		stamp(buf, i)
		_, err := o.WriteAt(buf, int64(i%chunks)*cs)
		require.NoError(t, err)
		_, err = s.CreateSnapshot(fmt.Sprintf("s%d", i), o)
		require.NoError(t, err)
	}
	// At snapshot k, chunk c holds the last i <= k with i%chunks == c.
	want := func(k, c uint64) uint64 {
		if k < c {
			return 0
		}
		return k - (k-c)%chunks
	}
	verify := func(s *Store) {
		got, exp := make([]byte, cs), make([]byte, cs)
		zero := make([]byte, cs)
		for k := uint64(1); k <= nsnap; k++ {
			v, err := s.OpenVolume(fmt.Sprintf("s%d", k))
			require.NoError(t, err)
			cs3 := []uint64{k % chunks, (k + 1) % chunks, (k * 7) % chunks}
			if k%2000 == 0 {
				cs3 = cs3[:0]
				for c := range chunks {
					cs3 = append(cs3, c)
				}
			}
			for _, c := range cs3 {
				_, err := v.ReadAt(got, int64(c)*cs)
				require.NoError(t, err)
				if w := want(k, c); w == 0 {
					copy(exp, zero) // the origin's initial contents
				} else {
					stamp(exp, w)
				}
				require.Equal(t, exp, got, "snapshot %d chunk %d", k, c)
			}
		}
	}
	verify(s)
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	verify(s)
	require.NoError(t, s.Check())
	require.Len(t, s.List(), nsnap+1)
}

// TestScaleCloneChain builds a chain of 100 clones, each a clone of the
// previous one that writes one chunk, and checks every level.
func TestScaleCloneChain(t *testing.T) {
	const depth, cs = 100, 4096
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs})
	_ = store
	chunks := uint64(origin.Size() / cs)
	initial := make([]byte, origin.Size())
	_, err := origin.ReadAt(initial, 0)
	require.NoError(t, err)
	model := append([]byte(nil), initial...)
	models := make([][]byte, depth+1)
	vols := make([]*Volume, depth+1)
	vols[0] = s.Origin()
	buf := make([]byte, cs)
	for l := 1; l <= depth; l++ {
		c, err := s.CreateClone(fmt.Sprintf("c%d", l), vols[l-1])
		require.NoError(t, err)
		stamp(buf, uint64(l))
		off := int64(uint64(l*3)%chunks) * cs
		_, err = c.WriteAt(buf, off)
		require.NoError(t, err)
		copy(model[off:], buf)
		vols[l], models[l] = c, append([]byte(nil), model...)
	}
	got := make([]byte, origin.Size())
	for l := 1; l <= depth; l++ {
		_, err := vols[l].ReadAt(got, 0)
		require.NoError(t, err)
		require.Equal(t, models[l], got, "clone at depth %d", l)
	}
	// The origin changes under the chain; no clone sees it.
	_, err = vols[0].WriteAt(make([]byte, 64<<10), 0)
	require.NoError(t, err)
	_, err = vols[depth].ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, models[depth], got)
	mustCheck(t, s)
}

// TestStoreOpenScale measures the store at BLOCKSNAP_SCALE chunk versions
// (for example 1000000): one snapshot of a 4 KiB-chunk origin, then every
// origin chunk written once, in random order (BLOCKSNAP_SCALE_ORDER=
// sequential: in order, 64 chunks a write), so each write copies one
// chunk. It logs the heap per version, Open after a clean Close, and Open
// after a crash (the metadata file copied while the store is open, after
// a Flush, so the journal tail since the last tree commit is replayed).
// Skipped without the variable: it is a measurement, not a test.
func TestStoreOpenScale(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("BLOCKSNAP_SCALE"))
	if n <= 0 {
		t.Skip("set BLOCKSNAP_SCALE=N (chunk versions) to run")
	}
	const cs = 4096
	order := os.Getenv("BLOCKSNAP_SCALE_ORDER")
	origin, err := blockdevtest.NewNull(int64(n)*cs, 4096)
	require.NoError(t, err)
	total := int64(n+n/8)*cs + 512<<20 // the data region, and room for the journal and metadata
	dir := t.TempDir()
	opts := Options{ChunkSize: cs, CommitInterval: -1}
	if mc, _ := strconv.ParseInt(os.Getenv("BLOCKSNAP_SCALE_CACHE"), 10, 64); mc > 0 {
		opts.MetadataCache = mc // bytes; a cache smaller than the tree, as at 10M random with the default
	}
	if l, _ := strconv.Atoi(os.Getenv("BLOCKSNAP_SCALE_LEAVES")); l > 0 {
		opts.treeLeaves = l // the tree-commit leaf bound (treeCommitLeaves), scaled with the tree
	}
	g, err := layout(origin, sized{origin, total}, &opts) // where a store of this size puts its data region
	require.NoError(t, err)
	mf, err := blockdev.Create(filepath.Join(dir, "meta"), g.dataOff, blockdev.FileOptions{})
	require.NoError(t, err)
	null, err := blockdevtest.NewNull(total-g.dataOff, 4096)
	require.NoError(t, err)
	store := &blockdevtest.Split{Head: mf, Tail: null, At: g.dataOff}
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	o := s.Origin()
	_, err = s.CreateSnapshot("s", o)
	require.NoError(t, err)
	var worst time.Duration // the slowest origin write
	write := func(p []byte, c int) {
		t0 := time.Now()
		_, err := o.WriteAt(p, int64(c)*cs)
		worst = max(worst, time.Since(t0))
		require.NoError(t, err)
	}
	t0 := time.Now()
	if order == "sequential" {
		buf := make([]byte, 64*cs)
		for c := 0; c < n; c += 64 {
			write(buf[:min(64, n-c)*cs], c)
		}
	} else {
		buf := make([]byte, cs)
		for _, c := range rand.New(rand.NewPCG(1, 2)).Perm(n) {
			write(buf, c)
		}
	}
	require.NoError(t, o.Flush())
	fill := time.Since(t0)
	runtime.GC()
	runtime.ReadMemStats(&m1)
	if hp := os.Getenv("BLOCKSNAP_SCALE_HEAPPROFILE"); hp != "" {
		f, err := os.Create(hp)
		require.NoError(t, err)
		require.NoError(t, pprof.WriteHeapProfile(f))
		require.NoError(t, f.Close())
	}
	st := s.Stats()
	cst, cache := s.m.CommitStats(), s.m.CacheStats()
	t.Logf("fill: %d tree commits writing %d pages (worst freeze %v), %d pages written back (%.2f pages/version); worst write %v; %d writers waited for a commit by the leaf bound %d, %d wrote one",
		cst.Commits, cst.Pages, cst.WorstFreeze, cache.WrittenBack, float64(cst.Pages+cache.WrittenBack)/float64(n), worst,
		s.leafWaits.Load(), opts.leafBound(), s.leafCommits.Load())
	t.Logf("%d versions (%s) in %v; heap in use %.1f MiB (%.1f B/version); metadata %.1f MiB on disk (%.2f B/version)",
		st.IndexEntries, order, fill, float64(m1.HeapInuse)/(1<<20), float64(int64(m1.HeapInuse)-int64(m0.HeapInuse))/float64(st.IndexEntries),
		float64(st.MetadataBytes)/(1<<20), float64(st.MetadataBytes)/float64(st.IndexEntries))
	// A crash image: the metadata file as it is now, the store open.
	s.mu.Lock()
	for s.capOut {
		s.capDone.Wait()
	}
	tail, tailLeaves := s.j.LastSeq()-s.lastTreeSeq, s.m.TailLeaves()
	crashed := filepath.Join(dir, "crashed")
	err = copyFile(filepath.Join(dir, "meta"), crashed)
	s.mu.Unlock()
	require.NoError(t, err) // not under mu: a failure would leave it held
	// The pages in use above count, twice, each node the open transaction
	// shadowed since the last tree commit: its old page is held until a
	// commit is durable. After a tree commit only the live trees and maps
	// remain.
	require.NoError(t, s.Checkpoint(context.Background()))
	st = s.Stats()
	t.Logf("after a tree commit: metadata %.1f MiB on disk (%.2f B/version)",
		float64(st.MetadataBytes)/(1<<20), float64(st.MetadataBytes)/float64(st.IndexEntries))
	t0 = time.Now()
	require.NoError(t, s.Close())
	t.Logf("Close (a tree commit) %v", time.Since(t0))
	pristine := filepath.Join(dir, "pristine") // the crash image, for the A/B Opens below
	if os.Getenv("BLOCKSNAP_SCALE_AB") != "" {
		require.NoError(t, copyFile(crashed, pristine))
	}
	for _, c := range []struct{ name, path string }{{"clean Close", filepath.Join(dir, "meta")}, {fmt.Sprintf("a crash (%d records to replay, their changes wrote %d leaves)", tail, tailLeaves), crashed}} {
		if os.Getenv("BLOCKSNAP_SCALE_COLD") != "" {
			require.NoError(t, replayDropCached(c.path))
		}
		f, err := blockdev.Open(c.path, blockdev.FileOptions{})
		require.NoError(t, err)
		store.Head = f
		stop := replayProfile(t, c.path == crashed)
		t0 := time.Now()
		s, err := Open(origin, store, opts)
		stop()
		require.NoError(t, err)
		t.Logf("Open after %s: %v (replay: %d leaves written, %d read-ahead windows, %d nodes read ahead)", c.name, time.Since(t0), s.m.TouchedLeaves(), s.replayWindows, s.m.CacheStats().ReadAhead)
		require.NoError(t, s.Close())
		require.NoError(t, f.Close())
	}
	// BLOCKSNAP_SCALE_AB=N: N more Opens of the crash image each with the
	// replay's read-ahead and without, alternately, so that the two are
	// compared under the same load. Each opens a fresh copy: an Open's
	// Close commits the tree, after which the image has no tail.
	ab, _ := strconv.Atoi(os.Getenv("BLOCKSNAP_SCALE_AB"))
	for i := range 2 * ab {
		img := filepath.Join(dir, "ab")
		require.NoError(t, copyFile(pristine, img))
		if os.Getenv("BLOCKSNAP_SCALE_COLD") != "" {
			require.NoError(t, replayDropCached(img))
		}
		f, err := blockdev.Open(img, blockdev.FileOptions{})
		require.NoError(t, err)
		store.Head = f
		o := opts
		o.noReadAhead = i%2 == 1
		t0 := time.Now()
		s, err := Open(origin, store, o)
		require.NoError(t, err)
		t.Logf("Open after a crash, read-ahead %v: %v", !o.noReadAhead, time.Since(t0))
		require.NoError(t, s.Close())
		require.NoError(t, f.Close())
	}
}

// replayDropCached asks the kernel to drop the file's pages from its
// page cache (they are clean: copyFile synced them), so that an Open
// timed on it reads from the disk, as after a real crash and reboot
// (BLOCKSNAP_SCALE_COLD=1). Where the kernel has no such call it does
// nothing and the Open reads from the page cache.
func replayDropCached(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return err
	}
	return dropCached(f)
}

// replayProfile starts a CPU profile of the Open after a crash when
// BLOCKSNAP_SCALE_PROFILE names a file, and returns what stops it.
func replayProfile(t *testing.T, crash bool) func() {
	path := os.Getenv("BLOCKSNAP_SCALE_PROFILE")
	if path == "" || !crash {
		return func() {}
	}
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, pprof.StartCPUProfile(f))
	return func() {
		pprof.StopCPUProfile()
		require.NoError(t, f.Close())
	}
}

// copyFile copies from to to and syncs the copy, so that the Open timed on
// it does not pay for writing back the copy's dirty pages at its first
// flush (about 2 s for the 0.5 GB image of a 10M-version store).
func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
