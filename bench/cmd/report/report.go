package main

import (
	"flag"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/blocksnap/blocksnap/bench"
)

// testingInit registers the testing flags so that testing.Benchmark can be
// told how long to run.
func testingInit() {
	testing.Init()
}

type report struct {
	env   bench.Env
	quick bool
	count int
	// firstWrite[engine][snaps] = MB/s, kept for the chart.
	firstWrite map[string]map[int]float64
}

// figure is the median of a benchmark's runs.
type figure struct {
	ok      bool
	mbps    float64
	iops    float64
	p50ns   float64
	p99ns   float64
	nsPerOp float64
	// idle read latencies (CloneHydrate: the same reads after hydration).
	idleP50ns, idleP99ns float64
	// extra holds every other custom metric, by unit.
	extra map[string]float64
}

// measure runs fn count times with the given benchtime ("1x", "20000x",
// "1s") and returns the median of each figure.
func (r *report) measure(benchtime string, fn func(b *testing.B)) figure {
	if err := flag.Set("test.benchtime", benchtime); err != nil {
		fatal(err)
	}
	var runs []figure
	for range r.count {
		res := testing.Benchmark(fn)
		if res.N == 0 {
			continue // skipped or failed; testing printed why
		}
		f := figure{ok: true, nsPerOp: float64(res.NsPerOp()), iops: res.Extra["iops"], p50ns: res.Extra["p50-ns"], p99ns: res.Extra["p99-ns"],
			idleP50ns: res.Extra["idle-p50-ns"], idleP99ns: res.Extra["idle-p99-ns"], extra: res.Extra}
		if res.T > 0 && res.Bytes > 0 {
			f.mbps = float64(res.Bytes) * float64(res.N) / 1e6 / res.T.Seconds()
		}
		runs = append(runs, f)
	}
	if len(runs) == 0 {
		return figure{}
	}
	med := func(get func(figure) float64) float64 {
		v := make([]float64, len(runs))
		for i, f := range runs {
			v[i] = get(f)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	extra := map[string]float64{}
	for k := range runs[0].extra {
		extra[k] = med(func(f figure) float64 { return f.extra[k] })
	}
	return figure{
		ok:        true,
		extra:     extra,
		mbps:      med(func(f figure) float64 { return f.mbps }),
		iops:      med(func(f figure) float64 { return f.iops }),
		p50ns:     med(func(f figure) float64 { return f.p50ns }),
		p99ns:     med(func(f figure) float64 { return f.p99ns }),
		nsPerOp:   med(func(f figure) float64 { return f.nsPerOp }),
		idleP50ns: med(func(f figure) float64 { return f.idleP50ns }),
		idleP99ns: med(func(f figure) float64 { return f.idleP99ns }),
	}
}

func (r *report) snapCounts(engine string) []int {
	switch engine {
	case "raw":
		return []int{0}
	case "exception":
		if r.quick {
			return []int{0, 1, 2, 4, 8}
		}
		return []int{0, 1, 2, 4, 8, 16}
	}
	if r.quick {
		return []int{0, 1, 8, 64, 1024}
	}
	return []int{0, 1, 8, 64, 256, 1024}
}

func (r *report) jobs() []int {
	if r.quick {
		return []int{1, 4, 16}
	}
	return []int{1, 2, 4, 8, 16}
}

func (r *report) ioTime() string {
	if r.quick {
		return "20000x"
	}
	return "2s"
}

func cell(f figure, v float64, format string) string {
	if !f.ok {
		return "n/a"
	}
	return fmt.Sprintf(format, v)
}

// seed004 is the dm-snapshot write throughput from the mailing-list post
// this project grew from (bonnie on dm-snapshot, persistent stores).
var seed004 = map[int]float64{0: 373, 1: 55, 2: 16, 4: 14, 8: 6.5}

func (r *report) run(w io.Writer) {
	fmt.Fprintf(w, "# blocksnap benchmark report\n\nMachine: %s.\n", machine(r.env))
	fmt.Fprintf(w, "Each figure is the median of %d run(s). Random I/O is 4 KiB; engines use 4 KiB chunks; origin writes use %d goroutines.\n", r.count, bench.Writers)
	r.firstWriteTable(w)
	r.ratioTable(w)
	r.concurrencyTable(w)
	r.extraTables(w)
	r.backendTable(w)
}

func (r *report) firstWriteTable(w io.Writer) {
	fmt.Fprintf(w, "\n## Origin first writes, MB/s by snapshot count\n\nEvery 4 KiB block of a 64 MiB region written once in random order (BenchmarkOriginFirstWrite).\n\n")
	r.firstWrite = map[string]map[int]float64{}
	counts := map[int]bool{}
	for _, e := range bench.Engines {
		r.firstWrite[e.Name] = map[int]float64{}
		for _, n := range r.snapCounts(e.Name) {
			counts[n] = true
			f := r.measure("1x", func(b *testing.B) { bench.OriginFirstWrite(b, r.env, e, n) })
			if f.ok {
				r.firstWrite[e.Name][n] = f.mbps
			}
		}
	}
	keys := make([]int, 0, len(counts))
	for n := range counts {
		keys = append(keys, n)
	}
	sort.Ints(keys)
	header := []string{"snapshots", "dm-snapshot (seed 004, bonnie)"}
	for _, e := range bench.Engines {
		header = append(header, e.Name)
	}
	table(w, header, func(emit func(...string)) {
		for _, n := range keys {
			row := []string{fmt.Sprint(n), "-"}
			if v, ok := seed004[n]; ok {
				row[1] = fmt.Sprintf("%.1f", v)
			}
			for _, e := range bench.Engines {
				v, ok := r.firstWrite[e.Name][n]
				switch {
				case ok:
					row = append(row, fmt.Sprintf("%.1f", v))
				case slices.Contains(r.snapCounts(e.Name), n):
					row = append(row, "n/a")
				default:
					row = append(row, "-")
				}
			}
			emit(row...)
		}
	})
}

func (r *report) ratioTable(w io.Writer) {
	fmt.Fprintf(w, "\n## Steady state against the raw device\n\nOverwrite: the region written a second time (BenchmarkOriginOverwrite). Snapshot read: random 4 KiB reads of the oldest snapshot after the origin was overwritten (BenchmarkSnapshotRead); raw reads the device itself.\n\n")
	raw, _ := bench.EngineByName("raw")
	rawOver := r.measure("1x", func(b *testing.B) { bench.OriginOverwrite(b, r.env, raw, 0) })
	rawRead := r.measure(r.ioTime(), func(b *testing.B) { bench.SnapshotRead(b, r.env, raw, 1) })
	table(w, []string{"engine", "snapshots", "overwrite MB/s", "x raw", "snapshot read MB/s", "x raw", "read p99 µs"}, func(emit func(...string)) {
		emit("raw", "0", cell(rawOver, rawOver.mbps, "%.1f"), "1.00", cell(rawRead, rawRead.mbps, "%.1f"), "1.00", cell(rawRead, rawRead.p99ns/1e3, "%.0f"))
		for _, e := range bench.Engines {
			if e.Name == "raw" {
				continue
			}
			counts := []int{1, 8}
			if e.Name == "snapshot" {
				counts = []int{1, 1024}
			}
			for _, n := range counts {
				over := r.measure("1x", func(b *testing.B) { bench.OriginOverwrite(b, r.env, e, n) })
				read := r.measure(r.ioTime(), func(b *testing.B) { bench.SnapshotRead(b, r.env, e, n) })
				emit(e.Name, fmt.Sprint(n), cell(over, over.mbps, "%.1f"), ratio(over.mbps, rawOver.mbps),
					cell(read, read.mbps, "%.1f"), ratio(read.mbps, rawRead.mbps), cell(read, read.p99ns/1e3, "%.0f"))
			}
		}
	})
}

func ratio(v, base float64) string {
	if v == 0 || base == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", v/base)
}

func (r *report) concurrencyTable(w io.Writer) {
	fmt.Fprintf(w, "\n## Concurrent origin writes with one snapshot active\n\n4 KiB random writes, J goroutines (BenchmarkConcurrentWrite): iops / p99 µs.\n\n")
	header := []string{"jobs"}
	for _, e := range bench.Engines {
		header = append(header, e.Name)
	}
	results := map[string]map[int]figure{}
	for _, e := range bench.Engines {
		results[e.Name] = map[int]figure{}
		for _, j := range r.jobs() {
			results[e.Name][j] = r.measure(r.ioTime(), func(b *testing.B) { bench.ConcurrentWrite(b, r.env, e, j) })
		}
	}
	table(w, header, func(emit func(...string)) {
		for _, j := range r.jobs() {
			row := []string{fmt.Sprint(j)}
			for _, e := range bench.Engines {
				f := results[e.Name][j]
				row = append(row, cell(f, f.iops, "%.0f")+" / "+cell(f, f.p99ns/1e3, "%.0f"))
			}
			emit(row...)
		}
	})
}

func (r *report) backendTable(w io.Writer) {
	fmt.Fprintf(w, "\n## Device backends\n\n4 KiB random writes to a 1 GiB file, Q requests in flight (BenchmarkDevice): iops / p99 µs.\n\n")
	qds := []int{1, 8, 32}
	if r.quick {
		qds = []int{1, 32}
	}
	header := []string{"backend"}
	for _, q := range qds {
		header = append(header, fmt.Sprintf("qd=%d", q))
	}
	table(w, header, func(emit func(...string)) {
		for _, be := range bench.Backends {
			row := []string{be}
			for _, q := range qds {
				f := r.measure(r.ioTime(), func(b *testing.B) { bench.Device(b, r.env, be, q) })
				row = append(row, cell(f, f.iops, "%.0f")+" / "+cell(f, f.p99ns/1e3, "%.0f"))
			}
			emit(row...)
		}
	})
}

// table prints a markdown table.
func table(w io.Writer, header []string, rows func(emit func(...string))) {
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(header, " | "), strings.Repeat("---|", len(header)))
	rows(func(cells ...string) { fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | ")) })
}

// chart draws first-write MB/s against snapshot count (log scale; 0 is
// drawn at the left edge) per engine, as SVG.
func (r *report) chart() string {
	const W, H, L, B, T, R = 640, 400, 60, 40, 30, 120
	maxMB := 1.0
	for _, m := range r.firstWrite {
		for _, v := range m {
			maxMB = math.Max(maxMB, v)
		}
	}
	for _, v := range seed004 {
		maxMB = math.Max(maxMB, v)
	}
	x := func(n int) float64 { return L + math.Log2(float64(n)+1)/math.Log2(1025)*(W-L-R) }
	y := func(v float64) float64 { return H - B - v/maxMB*(H-B-T) }
	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", W, H)
	fmt.Fprintf(&s, `<text x="%d" y="18">Origin first-write MB/s against snapshot count</text>`+"\n", L)
	fmt.Fprintf(&s, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/><line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", L, H-B, W-R, H-B, L, T, L, H-B)
	for _, n := range []int{0, 1, 2, 4, 8, 16, 64, 256, 1024} {
		fmt.Fprintf(&s, `<text x="%.0f" y="%d" text-anchor="middle">%d</text>`+"\n", x(n), H-B+16, n)
	}
	for i := 0; i <= 4; i++ {
		v := maxMB * float64(i) / 4
		fmt.Fprintf(&s, `<text x="%d" y="%.0f" text-anchor="end">%.0f</text>`+"\n", L-6, y(v)+4, v)
	}
	colors := []string{"#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"}
	series := []struct {
		name string
		pts  map[int]float64
	}{{"dm-snapshot (seed 004)", seed004}}
	for _, e := range bench.Engines {
		series = append(series, struct {
			name string
			pts  map[int]float64
		}{e.Name, r.firstWrite[e.Name]})
	}
	for i, se := range series {
		keys := make([]int, 0, len(se.pts))
		for n := range se.pts {
			keys = append(keys, n)
		}
		sort.Ints(keys)
		var pts []string
		for _, n := range keys {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(n), y(se.pts[n])))
		}
		c := colors[i%len(colors)]
		if len(pts) == 1 { // a single point (raw): a horizontal reference line
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(1024), y(se.pts[keys[0]])))
		}
		fmt.Fprintf(&s, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", c, strings.Join(pts, " "))
		fmt.Fprintf(&s, `<text x="%d" y="%d" fill="%s">%s</text>`+"\n", W-R+8, T+16*(i+1), c, se.name)
	}
	s.WriteString("</svg>\n")
	return s.String()
}
