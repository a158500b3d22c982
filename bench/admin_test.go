package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot"
)

// BenchmarkAdminUnderLoad builds a shared store with many chunk versions
// and snapshots (data-less: the origin and the data region are
// blockdevtest.Null, the journal and metadata region a sparse file), then
// runs a copy-on-write writer on the origin (one 4 KiB write at a time,
// each to a chunk not yet copied since the last snapshot) while it calls,
// one after another, Stat of a snapshot in the middle, Stats, Diff of the
// first and last snapshots, Check, and a Rollback of the origin to a
// snapshot taken just before (so almost all of it is the planning walk).
// It also runs two references: 200 ms of nothing (idle: the machine's
// own noise) and a tree commit alone (treecommit).
// It reports each call's time (<call>-ms), the writer's worst write while
// that call ran (<call>-stall-ms), and the writer's worst write and p99
// over all of them. Beside each stall it reports what it could be made
// of, measured in-process (far less sensitive to a loaded machine than the
// wall clock): the longest hold of Store.mu or the layer's lock, exclusive
// or shared without a break (<call>-hold-ms, and max-hold-ms over all),
// the longest wait to take one (<call>-wait-ms), the longest wait for
// room in a full origin buffer (<call>-bufwait-ms), the longest GC pause
// (<call>-gc-ms) and the longest a runnable goroutine waited for a
// processor (<call>-sched-ms); -v logs which function held and waited. The default is 100k versions and 1,000 snapshots;
// BLOCKSNAP_BENCH_ADMIN_FULL=1 runs 1M versions and 10,000 snapshots.
// One iteration is the whole run: use -benchtime=1x.
func BenchmarkAdminUnderLoad(b *testing.B) {
	versions, snaps := 100_000, 1_000
	if os.Getenv("BLOCKSNAP_BENCH_ADMIN_FULL") == "1" {
		versions, snaps = 1_000_000, 10_000
	}
	b.Run(fmt.Sprintf("versions=%s/snaps=%d", countName(uint64(versions)), snaps), func(b *testing.B) {
		for range b.N {
			adminUnderLoad(b, versions, snaps)
		}
	})
}

// stallWriter writes 4 KiB to random origin chunks until stopped,
// recording each write's time.
type stallWriter struct {
	hist   Hist
	worst  atomic.Int64 // ns, since the last take
	writes atomic.Uint64
	err    error
}

func (w *stallWriter) run(o *snapshot.Volume, chunks int64, seed uint64, stop <-chan struct{}) {
	rng := rand.New(rand.NewPCG(seed, 7))
	buf := make([]byte, 4096)
	for {
		select {
		case <-stop:
			return
		default:
		}
		t0 := time.Now()
		if _, err := o.WriteAt(buf, rng.Int64N(chunks)*4096); err != nil {
			w.err = err
			return
		}
		d := time.Since(t0)
		w.hist.Record(d)
		if int64(d) > w.worst.Load() {
			w.worst.Store(int64(d))
		}
		w.writes.Add(1)
	}
}

// settle waits until the writer has finished two more writes, so that a
// write the last call held up is counted against that call.
func (w *stallWriter) settle() {
	n := w.writes.Load()
	for w.writes.Load() < n+2 && w.err == nil {
		time.Sleep(time.Millisecond)
	}
}

func adminUnderLoad(b *testing.B, versions, snaps int) {
	const cs = 4096
	const chunks = 1 << 18 // a 1 GiB origin: the writer keeps finding chunks to copy
	origin, err := blockdevtest.NewNull(chunks*cs, 4096)
	if err != nil {
		b.Fatal(err)
	}
	opts := snapshot.Options{ChunkSize: cs, JournalSize: 64 << 20, MetadataBytes: 512 << 20}
	split := int64(1<<20) + opts.JournalSize + opts.MetadataBytes // past the superblock, journal and metadata region
	head, err := blockdev.Create(filepath.Join(b.TempDir(), "meta"), split, blockdev.FileOptions{})
	if err != nil {
		b.Fatal(err)
	}
	tail, err := blockdevtest.NewNull(int64(2*versions+4*chunks)*cs, 4096)
	if err != nil {
		b.Fatal(err)
	}
	s, err := snapshot.Format(origin, &blockdevtest.Split{Head: head, Tail: tail, At: split}, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	o := s.Origin()
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, cs)
	t0 := time.Now()
	snapVols := make([]*snapshot.Volume, 0, snaps)
	for i := range snaps {
		v, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), o)
		if err != nil {
			b.Fatal(err)
		}
		snapVols = append(snapVols, v)
		for range versions / snaps {
			if _, err := o.WriteAt(buf, rng.Int64N(chunks)*cs); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := o.Flush(); err != nil {
		b.Fatal(err)
	}
	fill := time.Since(t0)
	st := s.Stats()

	b.ResetTimer()
	var w stallWriter
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.run(o, chunks, 3, stop)
	}()
	w.settle()
	w.hist.Reset()
	var worstAll, holdAll time.Duration
	call := func(name string, fn func() error) {
		w.worst.Store(0)
		s.ResetLockStats()
		rs := NewRuntimeStalls()
		steal := StartSteal(100 * time.Millisecond)
		t0 := time.Now()
		if err := fn(); err != nil {
			steal.Stop()
			close(stop)
			wg.Wait()
			b.Fatalf("%s: %v", name, err)
		}
		took := time.Since(t0)
		w.settle()
		stall := time.Duration(w.worst.Load())
		ls := s.LockStats()
		gc, sched := rs.Since()
		stolen, burst := steal.Stop()
		hold := max(ls.Store.MaxHold, ls.Store.MaxShared, ls.Meta.MaxHold, ls.Meta.MaxShared)
		worstAll, holdAll = max(worstAll, stall), max(holdAll, hold)
		b.ReportMetric(ms(took), name+"-ms")
		b.ReportMetric(ms(stall), name+"-stall-ms")
		// What the stall is made of: the longest a lock the writer needs
		// was held (exclusive, or shared without a break), the longest
		// wait for one, the longest GC pause and scheduling latency.
		b.ReportMetric(ms(hold), name+"-hold-ms")
		b.ReportMetric(ms(max(ls.Store.MaxWait, ls.Meta.MaxWait)), name+"-wait-ms")
		b.ReportMetric(ms(gc), name+"-gc-ms")
		b.ReportMetric(ms(sched), name+"-sched-ms")
		// The hypervisor's: the most it took from one CPU in 100 ms.
		b.ReportMetric(ms(burst), name+"-steal-ms")
		b.ReportMetric(float64(ls.MetaLockedReads), name+"-locked-reads")
		b.ReportMetric(ms(ls.MaxBufferWait), name+"-bufwait-ms")
		b.Logf("%s: stall %v; Store.mu held %v by %s, shared %v by %s, waited %v by %s; Meta.mu held %v by %s, shared %v by %s, waited %v by %s; slowest page read %v, self write-back %v, %d index changes read pages, at most %d, %d pages read under Meta.mu; %d writes waited for origin-buffer room, at most %v; write-back waits %d, at most %v; gc pause %v, sched latency %v; steal %v, at most %v of one CPU in 100 ms",
			name, stall, ls.Store.MaxHold, ls.Store.HoldBy, ls.Store.MaxShared, ls.Store.SharedBy, ls.Store.MaxWait, ls.Store.WaitBy,
			ls.Meta.MaxHold, ls.Meta.HoldBy, ls.Meta.MaxShared, ls.Meta.SharedBy, ls.Meta.MaxWait, ls.Meta.WaitBy, ls.MaxPageRead, ls.MaxSelfWrite, ls.ChangesMissed, ls.MaxChangeMiss, ls.MetaLockedReads,
			ls.BufferWaits, ls.MaxBufferWait, ls.Throttled, ls.MaxThrottle, gc, sched, stolen, burst)
	}
	mid := fmt.Sprintf("s%d", snaps/2)
	// Two references: the writer's worst write while nothing else runs
	// (the noise floor of the machine), and a tree commit alone (which
	// each of Stat, Diff and Rollback starts, to read a committed view).
	call("idle", func() error { time.Sleep(200 * time.Millisecond); return nil })
	call("treecommit", func() error { return s.Checkpoint(context.Background()) })
	call("stat", func() error { _, err := s.Stat(mid); return err })
	call("stats", func() error { _ = s.Stats(); return nil })
	call("diff", func() error {
		for _, err := range s.Diff(snapVols[0], snapVols[len(snapVols)-1]) {
			if err != nil {
				return err
			}
		}
		return nil
	})
	call("check", s.Check)
	rb, err := s.CreateSnapshot("rollback", o)
	if err != nil {
		b.Fatal(err)
	}
	call("rollback", func() error { return s.Rollback(context.Background(), o, rb) })
	close(stop)
	wg.Wait()
	b.StopTimer()
	if w.err != nil {
		b.Fatal(w.err)
	}
	b.ReportMetric(float64(st.IndexEntries), "versions")
	b.ReportMetric(fill.Seconds(), "fill-s")
	b.ReportMetric(ms(worstAll), "worst-stall-ms")
	b.ReportMetric(ms(holdAll), "max-hold-ms")
	b.ReportMetric(float64(w.hist.Percentile(0.99).Microseconds()), "write-p99-µs")
	b.ReportMetric(float64(w.writes.Load()), "writes")
}
