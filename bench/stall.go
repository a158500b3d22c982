package bench

import (
	"math"
	"runtime/metrics"
	"time"
)

// RuntimeStalls reads the runtime's histograms of stop-the-world pauses
// for GC and of scheduling latency (how long a runnable goroutine waited
// for a processor), so a benchmark can tell a writer's stall caused by GC
// or by the machine's scheduler from one caused by a lock. Take one before
// a phase and call Since after it.
type RuntimeStalls struct {
	samples []metrics.Sample
}

// runtimeStallMetrics are the histograms read; both exist since Go 1.22.
var runtimeStallMetrics = []string{"/sched/pauses/total/gc:seconds", "/sched/latencies:seconds"}

// NewRuntimeStalls reads the histograms now.
func NewRuntimeStalls() *RuntimeStalls {
	r := &RuntimeStalls{samples: make([]metrics.Sample, len(runtimeStallMetrics))}
	for i, name := range runtimeStallMetrics {
		r.samples[i].Name = name
	}
	metrics.Read(r.samples)
	return r
}

// Since returns the longest GC pause and the longest scheduling latency
// observed since r was read (each the upper bound of the histogram bucket
// it fell into, so within the runtime's bucket resolution), and rereads r.
func (r *RuntimeStalls) Since() (gcPause, schedLatency time.Duration) {
	now := make([]metrics.Sample, len(r.samples))
	for i := range now {
		now[i].Name = r.samples[i].Name
	}
	metrics.Read(now)
	var worst [2]time.Duration
	for i := range now {
		worst[i] = histMaxNew(r.samples[i].Value, now[i].Value)
	}
	r.samples = now
	return worst[0], worst[1]
}

// histMaxNew returns the upper bound of the highest bucket whose count
// grew from before to after (0 if none did, or if the metric is missing).
func histMaxNew(before, after metrics.Value) time.Duration {
	if before.Kind() != metrics.KindFloat64Histogram || after.Kind() != metrics.KindFloat64Histogram {
		return 0
	}
	b, a := before.Float64Histogram(), after.Float64Histogram()
	if len(b.Counts) != len(a.Counts) {
		return 0
	}
	for i := len(a.Counts) - 1; i >= 0; i-- {
		if a.Counts[i] > b.Counts[i] {
			hi := a.Buckets[i+1]
			if math.IsInf(hi, 1) {
				hi = a.Buckets[i]
			}
			return time.Duration(hi * float64(time.Second))
		}
	}
	return 0
}

// ms is d in milliseconds, to the microsecond, for a benchmark metric.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
