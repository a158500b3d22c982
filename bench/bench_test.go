package bench

import (
	"fmt"
	"os"
	"testing"
	"time"
)

var env = EnvFromOS()

func TestMain(m *testing.M) {
	code := m.Run()
	Cleanup()
	os.Exit(code)
}

// Snapshot counts swept by the origin benchmarks (the README's Benchmarks
// section and the engine issues): exception up to 16, snapshot up to 1024.
var snapCounts = map[string][]int{
	"raw":       {0},
	"exception": {0, 1, 2, 4, 8, 16},
	"snapshot":  {0, 1, 8, 64, 1024},
}

func forEngines(b *testing.B, fn func(b *testing.B, e Engine, snaps int)) {
	for _, e := range Engines {
		for _, n := range snapCounts[e.Name] {
			b.Run(fmt.Sprintf("engine=%s/snaps=%d", e.Name, n), func(b *testing.B) { fn(b, e, n) })
		}
	}
}

func BenchmarkOriginFirstWrite(b *testing.B) {
	forEngines(b, func(b *testing.B, e Engine, n int) { OriginFirstWrite(b, env, e, n) })
}

func BenchmarkOriginOverwrite(b *testing.B) {
	forEngines(b, func(b *testing.B, e Engine, n int) { OriginOverwrite(b, env, e, n) })
}

func BenchmarkSnapshotRead(b *testing.B) {
	forEngines(b, func(b *testing.B, e Engine, n int) {
		if n == 0 {
			n = 1 // a snapshot read needs a snapshot
			if e.Name != "raw" {
				b.Skip("no snapshot at snaps=0")
			}
		}
		SnapshotRead(b, env, e, n)
	})
}

func BenchmarkConcurrentWrite(b *testing.B) {
	for _, e := range Engines {
		for _, j := range []int{1, 2, 4, 8, 16} {
			b.Run(fmt.Sprintf("engine=%s/jobs=%d", e.Name, j), func(b *testing.B) { ConcurrentWrite(b, env, e, j) })
		}
	}
}

func BenchmarkDevice(b *testing.B) {
	for _, be := range Backends {
		for _, qd := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("backend=%s/qd=%d", be, qd), func(b *testing.B) { Device(b, env, be, qd) })
		}
	}
}

// TestHist checks the histogram's percentiles against known samples.
func TestHist(t *testing.T) {
	var h Hist
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {0, time.Microsecond}} {
		got := h.Percentile(c.q)
		if got > c.want || float64(got) < float64(c.want)*0.93 {
			t.Errorf("p%v = %v, want within 7%% below %v", c.q*100, got, c.want)
		}
	}
	if h.Count() != 1000 {
		t.Fatalf("count %d", h.Count())
	}
}

func BenchmarkCloneRead(b *testing.B) {
	for _, d := range CloneDepths {
		b.Run(fmt.Sprintf("depth=%d", d), func(b *testing.B) { CloneRead(b, env, d) })
	}
}

func BenchmarkCloneHydrate(b *testing.B) {
	for _, m := range HydrateModes {
		b.Run("mode="+m, func(b *testing.B) { CloneHydrate(b, env, m) })
	}
	for _, d := range RemoteDelays {
		b.Run(fmt.Sprintf("mode=nbd-remote/delay=%v", d), func(b *testing.B) { CloneHydrateRemote(b, env, d) })
	}
}
