package main

import (
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/blocksnap/blocksnap/bench"
)

// extraTables prints the tables of engine-specific benchmarks that exist in
// package bench: clone reads by depth and hydration against a plain copy.
func (r *report) extraTables(w io.Writer) {
	if len(bench.CloneDepths) > 0 {
		fmt.Fprintf(w, "\n## Clone reads by depth\n\nRandom 4 KiB reads of a clone D levels deep whose data lives at the top of the chain (BenchmarkCloneRead).\n\n")
		var base float64
		table(w, []string{"depth", "MB/s", "x depth 1", "p99 µs"}, func(emit func(...string)) {
			for _, d := range bench.CloneDepths {
				f := r.measure(r.ioTime(), func(b *testing.B) { bench.CloneRead(b, r.env, d) })
				if d == 1 {
					base = f.mbps
				}
				emit(fmt.Sprint(d), cell(f, f.mbps, "%.1f"), ratio(f.mbps, base), cell(f, f.p99ns/1e3, "%.0f"))
			}
		})
	}
	if len(bench.HydrateModes) > 0 {
		fmt.Fprintf(w, "\n## Hydration against a plain copy\n\n256 MiB from source to destination (BenchmarkCloneHydrate); a foreground reader issues one random 4 KiB read of the clone per millisecond, during hydration and once it is idle.\n\n")
		copyMBps := map[string]float64{} // by source: "" or "-slow"
		table(w, []string{"mode", "MB/s", "x copy from the same source", "fg read p50 / p99 µs, hydrating", "idle"}, func(emit func(...string)) {
			for _, m := range bench.HydrateModes {
				f := r.measure("1x", func(b *testing.B) { bench.CloneHydrate(b, r.env, m) })
				kind, source, _ := strings.Cut(m, "-")
				if kind == "copy" {
					copyMBps[source] = f.mbps
					emit(m, cell(f, f.mbps, "%.1f"), "1.00", "-", "-")
					continue
				}
				emit(m, cell(f, f.mbps, "%.1f"), ratio(f.mbps, copyMBps[source]),
					cell(f, f.p50ns/1e3, "%.0f")+" / "+cell(f, f.p99ns/1e3, "%.0f"),
					cell(f, f.idleP50ns/1e3, "%.0f")+" / "+cell(f, f.idleP99ns/1e3, "%.0f"))
			}
		})
	}
	if len(bench.RemoteDelays) > 0 {
		fmt.Fprintf(w, "\n## Remote hydration against nbdcopy\n\nA 512 MiB image with 192 MiB of data served by `nbdkit --filter=delay file` with every read and block status delayed; `nbdcopy --flush` and our hydration (%d connections, ending with a Flush) back to back (BenchmarkCloneHydrate/mode=nbd-remote). At 1 ms a foreground reader reads the image's data through the clone and from the bare source alternately; the p99 of its reads that went to the source through the clone is shown beside that of the same reads from the bare source.\n\n", bench.RemoteConnections)
		table(w, []string{"read delay", "ours s", "nbdcopy s", "x nbdcopy", "fg read p99 µs, hydrating / bare source"}, func(emit func(...string)) {
			for _, d := range bench.RemoteDelays {
				f := r.measure("1x", func(b *testing.B) { bench.CloneHydrateRemote(b, r.env, d) })
				fg := "-"
				if f.p99ns > 0 {
					fg = cell(f, f.p99ns/1e3, "%.0f") + " / " + cell(f, f.extra["src-p99-ns"]/1e3, "%.0f")
				}
				emit(d.String(), cell(f, f.extra["ours-s"], "%.2f"), cell(f, f.extra["nbdcopy-s"], "%.2f"), cell(f, f.extra["x-nbdcopy"], "%.2f"), fg)
			}
		})
	}
}
