// Command report runs blocksnap's benchmark sweep in one process and prints
// markdown tables that compare the engines side by side: first-write MB/s by
// snapshot count (beside the dm-snapshot figures that started the project),
// overwrite and snapshot-read ratios to the raw device, concurrency iops and
// p99 by jobs, hydration against a plain copy, and the device backends. It
// also writes an SVG chart of first-write MB/s against snapshot count.
//
//	go run ./bench/cmd/report -quick
//	go run ./bench/cmd/report -out /tmp/report
//	go run ./bench/cmd/report -device /dev/nvme0n1 -destructive -backend uring
//
// Every figure is the median of -count runs of a testing.B benchmark with
// the same body as `go test -bench` in package bench.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/blocksnap/blocksnap/bench"
)

func main() {
	quick := flag.Bool("quick", false, "a short sweep: fewer snapshot counts and jobs, one run each")
	count := flag.Int("count", 0, "runs per figure, median reported (default 1 with -quick, 3 otherwise)")
	device := flag.String("device", "", "raw device to carve every benchmark device from (destroys its contents)")
	destructive := flag.Bool("destructive", false, "agree to destroy the contents of -device")
	dir := flag.String("dir", "", "directory for temporary files (default: $BLOCKSNAP_BENCH_DIR or the system's)")
	backend := flag.String("backend", "", "pread or uring (default: $BLOCKSNAP_BENCH_BACKEND or pread)")
	out := flag.String("out", "", "directory to write report.md and firstwrite.svg into (default: print only)")
	flag.Parse()

	env := bench.EnvFromOS()
	if *device != "" {
		env.Device, env.Destructive = *device, *destructive
	}
	if *dir != "" {
		env.Dir = *dir
	}
	if *backend != "" {
		env.Backend = *backend
	}
	if *count == 0 {
		*count = 3
		if *quick {
			*count = 1
		}
	}
	if env.Device != "" && !env.Destructive {
		fmt.Fprintln(os.Stderr, "report: -device destroys the device's contents; add -destructive to agree")
		os.Exit(2)
	}
	testingInit()
	defer bench.Cleanup()

	r := &report{env: env, quick: *quick, count: *count}
	var md strings.Builder
	w := io.MultiWriter(os.Stdout, &md)
	start := time.Now()
	r.run(w)
	fmt.Fprintf(w, "\nSweep took %s.\n", time.Since(start).Round(time.Second))
	if *out != "" {
		if err := os.MkdirAll(*out, 0o755); err != nil {
			fatal(err)
		}
		if err := os.WriteFile(filepath.Join(*out, "report.md"), []byte(md.String()), 0o644); err != nil {
			fatal(err)
		}
		if err := os.WriteFile(filepath.Join(*out, "firstwrite.svg"), []byte(r.chart()), 0o644); err != nil {
			fatal(err)
		}
		fmt.Fprintf(os.Stderr, "report: wrote %s and %s\n", filepath.Join(*out, "report.md"), filepath.Join(*out, "firstwrite.svg"))
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "report:", err)
	os.Exit(1)
}

// machine returns the facts a reader needs to compare figures.
func machine(env bench.Env) string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if _, v, ok := strings.Cut(l, ":"); ok {
					model = strings.TrimSpace(v)
				}
				break
			}
		}
	}
	return fmt.Sprintf("%d CPUs (%s), %s/%s, kernel %s, %s, devices: %s",
		runtime.NumCPU(), model, runtime.GOOS, runtime.GOARCH, strings.TrimSpace(string(kernel)), runtime.Version(), env.Describe())
}
