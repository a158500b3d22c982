package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/clone"
)

// HydrateSize is the source BenchmarkCloneHydrate copies: 256 MiB.
const HydrateSize = 256 << 20

// HydrateModes are the BenchmarkCloneHydrate modes: a plain copy loop and
// the clone target's background hydration, each from a local file and from
// a slow source (a Delayed device: 1 ms per read, 128 MB/s, a remote image).
var HydrateModes = []string{"copy", "clone", "copy-slow", "clone-slow"}

// slowSource is what the -slow modes put in front of the source.
var slowSource = blockdevtest.DelayOptions{ReadLatency: time.Millisecond, BytesPerSecond: 128 << 20}

// CloneHydrate copies a 256 MiB source to a destination: mode copy with a
// loop of 1 MiB reads and writes (the baseline), mode clone with package
// clone's background hydration until it is done; both end with a Flush of
// the destination. MB/s. During the clone a foreground reader issues a
// random 4 KiB read of the clone every millisecond; its latencies are
// reported as p50-ns and p99-ns, the same reads against the hydrated
// clone afterwards as idle-p50-ns and idle-p99-ns, and (slow modes) the
// same reads against the bare source beforehand as src-p50-ns and
// src-p99-ns: the floor the machine allows, measured in the same run.
func CloneHydrate(b *testing.B, env Env, mode string) {
	b.SetBytes(HydrateSize)
	b.ReportAllocs()
	b.StopTimer()
	var busy, idle, bare Hist
	for range b.N {
		pool, err := NewPool(env)
		if err != nil {
			b.Fatal(err)
		}
		src, err := pool.Device("source", HydrateSize)
		if err != nil {
			b.Fatal(err)
		}
		if err := prefill(src, HydrateSize); err != nil {
			b.Fatal(err)
		}
		var source blockdev.Device = src
		if mode == "copy-slow" || mode == "clone-slow" {
			source = blockdevtest.NewDelayed(src, slowSource)
		}
		if mode == "clone-slow" {
			sampleFor(source, &bare, 200*time.Millisecond)
		}
		dst, err := pool.Device("dest", HydrateSize)
		if err != nil {
			b.Fatal(err)
		}
		switch mode {
		case "copy", "copy-slow":
			b.StartTimer()
			err = copyLoop(source, dst)
			b.StopTimer()
		case "clone", "clone-slow":
			err = hydrate(b, pool, source, dst, &busy, &idle)
		default:
			err = fmt.Errorf("unknown mode %q", mode)
		}
		pool.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	if busy.Count() > 0 {
		b.ReportMetric(float64(busy.Percentile(0.5).Nanoseconds()), "p50-ns")
		b.ReportMetric(float64(busy.Percentile(0.99).Nanoseconds()), "p99-ns")
		b.ReportMetric(float64(idle.Percentile(0.5).Nanoseconds()), "idle-p50-ns")
		b.ReportMetric(float64(idle.Percentile(0.99).Nanoseconds()), "idle-p99-ns")
	}
	reportBare(b, &bare)
}

// copyLoop is what a user would write without a clone target.
func copyLoop(src, dst blockdev.Device) error {
	buf := blockdev.AlignedBuffer(1 << 20)
	for off := int64(0); off < src.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), src.Size()-off)
		if _, err := src.ReadAt(buf[:n], off); err != nil {
			return err
		}
		if _, err := dst.WriteAt(buf[:n], off); err != nil {
			return err
		}
	}
	return dst.Flush()
}

// hydrate times a clone's background hydration, with the foreground reader.
func hydrate(b *testing.B, pool *Pool, src, dst blockdev.Device, busy, idle *Hist) error {
	meta, err := pool.Device("meta", clone.MetadataSize(src.Size(), 0)+(1<<20))
	if err != nil {
		return err
	}
	b.StartTimer()
	c, err := clone.Create(src, dst, meta, clone.Options{})
	if err != nil {
		b.StopTimer()
		return err
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		foreground(c, busy, stop)
	}()
	err = c.Wait(context.Background())
	if err == nil {
		err = c.Flush()
	}
	b.StopTimer()
	close(stop)
	wg.Wait()
	if err != nil {
		c.Close()
		return err
	}
	sampleFor(c, idle, 200*time.Millisecond)
	return c.Close()
}

// sampleFor runs the foreground reader against d for dur.
func sampleFor(d blockdev.Device, h *Hist, dur time.Duration) {
	done := make(chan struct{})
	time.AfterFunc(dur, func() { close(done) })
	foreground(d, h, done)
}

// reportBare reports the foreground reader's latencies against a bare
// source.
func reportBare(b *testing.B, h *Hist) {
	if h.Count() > 0 {
		b.ReportMetric(float64(h.Percentile(0.5).Nanoseconds()), "src-p50-ns")
		b.ReportMetric(float64(h.Percentile(0.99).Nanoseconds()), "src-p99-ns")
	}
}

// foreground reads a random 4 KiB block of d every millisecond until stop
// closes, recording latencies.
func foreground(d blockdev.Device, h *Hist, stop <-chan struct{}) {
	buf := blockdev.AlignedBuffer(BlockSize)
	rng := rand.New(rand.NewPCG(5, 5))
	blocks := d.Size() / BlockSize
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		start := time.Now()
		if _, err := d.ReadAt(buf, rng.Int64N(blocks)*BlockSize); err != nil {
			return
		}
		h.Record(time.Since(start))
	}
}
