package nbd

// Throughput next to the C peer: the same fio job (4k random writes, then
// random reads, iodepth 32, nbd engine over a Unix socket) against this
// server exporting a file and against `nbdkit file` on the same file.
// Then the TLS cost: the same workload from this package's client (fio's
// nbd engine refuses libnbd's tls-certificates URI parameter) against
// both servers, in plaintext and with TLS required (certificates made by
// certtool; those rows are left out without it). Runs only with
// BLOCKSNAP_NBD_BENCH=1; a benchmark, not a test (nothing is asserted
// about speed).
//
//	BLOCKSNAP_NBD_BENCH=1 go test -run TestFioThroughput -v ./nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
)

func TestFioThroughput(t *testing.T) {
	if os.Getenv("BLOCKSNAP_NBD_BENCH") != "1" {
		t.Skip("set BLOCKSNAP_NBD_BENCH=1 to compare with nbdkit")
	}
	need(t, "fio", "nbdkit")
	seconds := 10
	if s, err := strconv.Atoi(os.Getenv("BLOCKSNAP_NBD_BENCH_SECONDS")); err == nil && s > 0 {
		seconds = s
	}
	dir := t.TempDir()
	if d := os.Getenv("BLOCKSNAP_BENCH_DIR"); d != "" {
		dir = d
	}
	img := filepath.Join(dir, "nbd-bench.img")
	const size = 256 << 20
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i*7 + 1)
	}
	f, err := os.Create(img)
	require.NoError(t, err)
	for off := 0; off < size; off += len(chunk) {
		_, err := f.Write(chunk)
		require.NoError(t, err)
	}
	require.NoError(t, f.Close())
	t.Cleanup(func() { os.Remove(img) })

	dev, err := blockdev.Open(img, blockdev.FileOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	ours := startServerOn(t, "unix", Options{}, Export{Name: "f", Device: dev})

	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	startExternal(t, sock, "nbdkit", "-f", "--exit-with-parent", "-U", sock, "file", "file="+img)

	servers := []struct{ name, uri string }{
		{"blocksnap", ours.uri("f")},
		{"nbdkit-file", unixURI(sock, "")},
	}
	for _, rw := range []string{"randwrite", "randread"} {
		for _, s := range servers {
			iops := fioIOPS(t, s.uri, rw, seconds)
			line := fmt.Sprintf("nbd-bench server=%s rw=%s bs=4k iodepth=32 runtime=%ds iops=%.0f", s.name, rw, seconds, iops)
			t.Log(line)
			fmt.Println(line)
		}
	}
	if _, err := exec.LookPath("certtool"); err == nil {
		pki := newGnutlsPKI(t)
		oursTLS := startServerOn(t, "unix", Options{TLS: TLSRequire, TLSCertDir: pki.server},
			Export{Name: "f", Device: dev})
		tlsSock := filepath.Join(t.TempDir(), "nbdkit-tls.sock")
		startExternal(t, tlsSock, "nbdkit", "-f", "--exit-with-parent", "--tls=require",
			"--tls-certificates="+pki.server, "-U", tlsSock, "file", "file="+img)
		q := "&tls-certificates=" + pki.client
		servers = append(servers,
			struct{ name, uri string }{"blocksnap-tls", tlsURI(oursTLS, "f", pki.client)},
			struct{ name, uri string }{"nbdkit-file-tls", "nbds+unix:///?socket=" + tlsSock + q})
	}
	for _, rw := range []string{"randwrite", "randread"} {
		for _, s := range servers {
			iops := clientIOPS(t, s.uri, rw, seconds)
			line := fmt.Sprintf("nbd-bench client=go server=%s rw=%s bs=4k iodepth=32 runtime=%ds iops=%.0f", s.name, rw, seconds, iops)
			t.Log(line)
			fmt.Println(line)
		}
	}
}

// clientIOPS runs 4 KiB random reads or writes from 32 goroutines on one
// connection of this package's client for the given time.
func clientIOPS(t *testing.T, uri, rw string, seconds int) float64 {
	t.Helper()
	c := dial(t, uri)
	blocks := c.Size() / 4096
	var ops atomic.Int64
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	start := time.Now()
	var g errgroup.Group
	for w := range 32 {
		g.Go(func() error {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			p := make([]byte, 4096)
			for time.Now().Before(deadline) {
				off := rng.Int64N(blocks) * 4096
				var err error
				if rw == "randread" {
					_, err = c.ReadAt(p, off)
				} else {
					_, err = c.WriteAt(p, off)
				}
				if err != nil {
					return err
				}
				ops.Add(1)
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	return float64(ops.Load()) / time.Since(start).Seconds()
}

func fioIOPS(t *testing.T, uri, rw string, seconds int) float64 {
	t.Helper()
	out := run(t, "fio", "--name=bench", "--ioengine=nbd", "--uri="+uri, "--rw="+rw, "--bs=4k",
		"--iodepth=32", "--time_based", fmt.Sprintf("--runtime=%d", seconds), "--ramp_time=1",
		"--output-format=json")
	var res struct {
		Jobs []struct {
			Read, Write struct{ IOPS float64 }
		}
	}
	start := 0
	for start < len(out) && out[start] != '{' {
		start++ // fio may print notes before the JSON
	}
	require.NoError(t, json.Unmarshal([]byte(out[start:]), &res), out)
	require.Len(t, res.Jobs, 1)
	if rw == "randread" {
		return res.Jobs[0].Read.IOPS
	}
	return res.Jobs[0].Write.IOPS
}

// BenchmarkRoundTrip measures 4 KiB requests through the client and the
// server in one process (allocations of both sides included), at about 32
// in flight, in plaintext and over TLS. cpu-ns/op is the CPU time of both
// sides per request, the figure to compare on a loaded machine.
func BenchmarkRoundTrip(b *testing.B) {
	for _, mode := range []string{"plain", "tls"} {
		for _, op := range []string{"read", "write"} {
			b.Run("tls="+mode+"/op="+op, func(b *testing.B) { benchRoundTrip(b, mode == "tls", op) })
		}
	}
}

func benchRoundTrip(b *testing.B, withTLS bool, op string) {
	mem, err := blockdev.NewMem(64<<20, 4096)
	require.NoError(b, err)
	// Data everywhere, so that reads carry 4 KiB and are not sent as
	// holes.
	fill := bytes.Repeat([]byte{0x5a}, 1<<20)
	for off := int64(0); off < mem.Size(); off += int64(len(fill)) {
		_, err := mem.WriteAt(fill, off)
		require.NoError(b, err)
	}
	opts := Options{}
	if withTLS {
		ca := newTestCA(b, "bench CA")
		opts.TLS, opts.TLSCertDir = TLSRequire, ca.certDir(b, true, "localhost")
	}
	srv, err := New(opts, Export{Name: "m", Device: mem})
	require.NoError(b, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	go srv.Serve(context.Background(), l)
	defer srv.Close()
	uri := URI(l.Addr(), "m")
	if withTLS {
		uri = fmt.Sprintf("nbds://%s/m?tls-certificates=%s", l.Addr(), opts.TLSCertDir)
	}
	c, err := Dial(context.Background(), uri)
	require.NoError(b, err)
	defer c.Close()
	b.SetBytes(4096)
	b.ReportAllocs()
	b.SetParallelism((32 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	cpu0, cpuOK := cpuTime()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 4096)
		off := int64(0)
		var err error
		for pb.Next() {
			off = (off + 4096*17) % (64 << 20)
			if op == "read" {
				_, err = c.ReadAt(p, off)
			} else {
				_, err = c.WriteAt(p, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
	if cpu1, ok := cpuTime(); ok && cpuOK {
		// Client and server together: the whole cost of a request.
		b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
	}
}
