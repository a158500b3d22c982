package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/nbd"
)

// The remote hydration benchmark: the source a user would hydrate from
// over a WAN, served by a server nobody here wrote, against the tool they
// would otherwise use. A 512 MiB image with 192 MiB of data (64 extents of
// 3 MiB at random places, the rest holes) is served read-only by `nbdkit
// --filter=delay file IMAGE rdelay=D delay-extents=D` (reads and block
// status delayed, as over a WAN; both tools map the holes with block
// status, so both pay for its round trips); each iteration runs `nbdcopy --flush`
// from it into a new sparse file, then our clone hydration into another
// (dialled with RemoteConnections connections, Wait, then Flush, which
// commits the metadata), back to back. Both destinations are compared with
// the image byte for byte, and every hole of the image must be a hole in
// them (SEEK_DATA). Reported: MB/s of ours over the whole image (the
// timer), ours-s and nbdcopy-s (median seconds per copy), x-nbdcopy, the
// median over iterations of the ratio of the two back-to-back times
// (nbdcopy's over ours: above 1, we are faster; pairing keeps a noisy
// machine's bursts out of the ratio), worst-x-nbdcopy, the lowest of those
// ratios, and dest-MiB, the bytes our destination allocates. Each
// iteration's pair is logged (-v).
//
// With delay=1ms a foreground reader runs while the clone hydrates: every
// millisecond it reads a random 4 KiB block of the image's data through
// the clone and the same block from the bare source (its own connection
// to the same server), in alternating order, so that both see the same
// moment of a noisy machine. Of the probes whose read through the clone
// went to the source (src-probes; dst-probes found the region hydrated),
// it reports p50-ns and p99-ns through the clone, src-p50-ns and
// src-p99-ns of the same reads from the bare source, and p99-x-src, the
// ratio of the two p99s (the bound: 3).

// RemoteSize and RemoteData are the image's size and data.
const (
	RemoteSize = 512 << 20
	RemoteData = 192 << 20
)

// RemoteDelays are the source read latencies of the nbd-remote mode.
var RemoteDelays = []time.Duration{time.Millisecond, 2 * time.Millisecond, 20 * time.Millisecond}

// RemoteConnections is how many connections our hydration opens, as many
// as nbdcopy's default.
const RemoteConnections = 4

// CloneHydrateRemote runs the remote benchmark at one source latency. It
// skips when nbdkit or nbdcopy is missing.
func CloneHydrateRemote(b *testing.B, env Env, delay time.Duration) {
	for _, tool := range []string{"nbdkit", "nbdcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed (Debian: nbdkit, libnbd-bin)", tool)
		}
	}
	b.SetBytes(RemoteSize)
	b.ReportAllocs()
	b.StopTimer()
	dir, err := os.MkdirTemp(env.Dir, "blocksnap-remote-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "source.img")
	exts, err := writeSparseImage(img)
	if err != nil {
		b.Fatal(err)
	}
	uri, stop, err := serveDelayed(dir, img, delay)
	if err != nil {
		b.Fatal(err)
	}
	defer stop()
	var ours, peer []float64 // seconds per iteration, paired
	var alloc int64
	var pr *probes
	if delay == time.Millisecond {
		bare, err := nbd.Dial(context.Background(), uri)
		if err != nil {
			b.Fatal(err)
		}
		defer bare.Close()
		pr = &probes{bare: bare, exts: exts}
	}
	for i := range b.N {
		// Odd iterations run ours first: neither side always follows
		// the other's writeback.
		for k := range 2 {
			if (i+k)%2 == 0 {
				el, err := runNbdcopy(uri, img, filepath.Join(dir, "nbdcopy.img"))
				if err != nil {
					b.Fatal(err)
				}
				peer = append(peer, el.Seconds())
				continue
			}
			dst := filepath.Join(dir, "clone.img")
			el, err := hydrateRemote(b, uri, dst, filepath.Join(dir, "clone.meta"), pr)
			ours = append(ours, el.Seconds())
			if err != nil {
				b.Fatal(err)
			}
			if err := sameSparse(img, dst); err != nil {
				b.Fatalf("our copy: %v", err)
			}
			if alloc, err = allocated(dst); err != nil {
				b.Fatal(err)
			}
			os.Remove(dst)
		}
	}
	ratios := make([]float64, len(ours))
	for i := range ours {
		ratios[i] = peer[i] / ours[i]
		b.Logf("iteration %d: nbdcopy %.3f s, ours %.3f s, x%.2f", i, peer[i], ours[i], ratios[i])
	}
	b.ReportMetric(median(ours), "ours-s")
	b.ReportMetric(median(peer), "nbdcopy-s")
	b.ReportMetric(median(ratios), "x-nbdcopy")
	b.ReportMetric(ratios[0], "worst-x-nbdcopy") // median sorted them
	b.ReportMetric(float64(alloc)/(1<<20), "dest-MiB")
	if pr != nil && pr.through.Count() > 0 {
		p99 := pr.through.Percentile(0.99)
		b.ReportMetric(float64(pr.through.Percentile(0.5).Nanoseconds()), "p50-ns")
		b.ReportMetric(float64(p99.Nanoseconds()), "p99-ns")
		reportBare(b, &pr.direct)
		b.ReportMetric(float64(p99)/float64(pr.direct.Percentile(0.99)), "p99-x-src")
		b.ReportMetric(float64(pr.through.Count()), "src-probes")
		b.ReportMetric(float64(pr.local.Load()), "dst-probes")
	}
}

// probes is the foreground reader of the delay=1ms runs. Of the probes
// whose read through the clone went to the source (a region not yet
// hydrated), it keeps the latency through the clone and that of the same
// read from the bare source; the others read the destination.
type probes struct {
	bare            blockdev.Device
	exts            []int64      // where the image's data extents start
	hits            atomic.Int64 // 4 KiB reads that reached the clone's source
	through, direct Hist
	local           atomic.Int64 // probes the destination answered
}

// probedSource is the clone's source in the delay=1ms runs: it counts the
// reads of one 4 KiB block, which only the probes make (background copies
// read whole regions).
type probedSource struct {
	*nbd.Client
	hits *atomic.Int64
}

func (s probedSource) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == BlockSize {
		s.hits.Add(1)
	}
	return s.Client.ReadAt(p, off)
}

// run reads a random 4 KiB block of the image's data through c and from
// the bare source every millisecond, alternating which goes first, until
// stop closes. Only data: holes hydrate first and at once.
func (pr *probes) run(c blockdev.Device, stop <-chan struct{}) {
	buf := blockdev.AlignedBuffer(BlockSize)
	rng := rand.New(rand.NewPCG(5, 5))
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		off := pr.exts[rng.IntN(len(pr.exts))] + rng.Int64N(remoteExtent/BlockSize)*BlockSize
		var lat [2]time.Duration // through the clone, bare
		hits := pr.hits.Load()
		for k := range 2 {
			d, j := c, 0
			if (i+k)%2 == 1 {
				d, j = pr.bare, 1
			}
			start := time.Now()
			if _, err := d.ReadAt(buf, off); err != nil {
				return
			}
			lat[j] = time.Since(start)
		}
		if pr.hits.Load() == hits {
			pr.local.Add(1)
			continue
		}
		pr.through.Record(lat[0])
		pr.direct.Record(lat[1])
	}
}

// runNbdcopy copies uri to a new file dst with nbdcopy, checks it against
// img and removes it.
func runNbdcopy(uri, img, dst string) (time.Duration, error) {
	start := time.Now()
	out, err := exec.Command("nbdcopy", "--flush", uri, dst).CombinedOutput()
	el := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("nbdcopy: %v: %s", err, out)
	}
	if err := sameSparse(img, dst); err != nil {
		return 0, fmt.Errorf("nbdcopy's copy: %v", err)
	}
	return el, os.Remove(dst)
}

// median of v (v is reordered).
func median(v []float64) float64 {
	slices.Sort(v)
	return v[len(v)/2]
}

// hydrateRemote hydrates a new sparse file at dst from uri, timed from the
// dial to the final Flush, with the foreground reader if pr is set.
func hydrateRemote(b *testing.B, uri, dst, metaPath string, pr *probes) (time.Duration, error) {
	for _, f := range []struct {
		path string
		size int64
	}{{dst, RemoteSize}, {metaPath, clone.MetadataSize(RemoteSize, 0)}} {
		if err := createSparse(f.path, f.size); err != nil {
			return 0, err
		}
	}
	dd, err := blockdev.Open(dst, blockdev.FileOptions{})
	if err != nil {
		return 0, err
	}
	defer dd.Close()
	md, err := blockdev.Open(metaPath, blockdev.FileOptions{})
	if err != nil {
		return 0, err
	}
	defer md.Close()
	b.StartTimer()
	start := time.Now()
	src, err := nbd.DialWith(context.Background(), uri, nbd.DialOptions{Connections: RemoteConnections})
	if err != nil {
		b.StopTimer()
		return 0, err
	}
	defer src.Close()
	var source blockdev.Device = src
	if pr != nil {
		source = probedSource{Client: src, hits: &pr.hits}
	}
	c, err := clone.Create(source, dd, md, clone.Options{})
	if err != nil {
		b.StopTimer()
		return 0, err
	}
	stopFg := make(chan struct{})
	var wg sync.WaitGroup
	if pr != nil {
		wg.Go(func() { pr.run(c, stopFg) })
	}
	err = c.Wait(context.Background())
	if err == nil {
		err = c.Flush()
	}
	el := time.Since(start)
	b.StopTimer()
	close(stopFg)
	wg.Wait()
	return el, errors.Join(err, c.Close())
}

func createSparse(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return errors.Join(f.Truncate(size), f.Close())
}

// remoteExtent is the size of the image's data extents.
const remoteExtent = 3 << 20

// writeSparseImage writes the source image: 64 extents of 3 MiB of random
// data, one at a random MiB-aligned place in each 8 MiB, the rest holes. It
// returns where the extents start.
func writeSparseImage(path string) ([]int64, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(RemoteSize); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(18, 512))
	const ext, stride = remoteExtent, 8 << 20
	buf := make([]byte, ext)
	var exts []int64
	for off := int64(0); off < RemoteSize; off += stride {
		for i := range buf {
			buf[i] = byte(rng.Uint32()) | 1
		}
		at := off + rng.Int64N((stride-ext)>>20+1)<<20
		if _, err := f.WriteAt(buf, at); err != nil {
			return nil, err
		}
		exts = append(exts, at)
	}
	return exts, f.Sync()
}

// serveDelayed starts nbdkit serving img read-only with every read and
// block status delayed by delay, on a Unix socket in dir; stop kills it.
func serveDelayed(dir, img string, delay time.Duration) (uri string, stop func(), err error) {
	sock := filepath.Join(dir, "nbdkit.sock")
	cmd := exec.Command("nbdkit", "-f", "--exit-with-parent", "-r", "-U", sock,
		"--filter=delay", "file", img, fmt.Sprintf("rdelay=%dms", delay.Milliseconds()),
		fmt.Sprintf("delay-extents=%dms", delay.Milliseconds()))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	stop = func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	// The socket file appears before nbdkit listens on it: wait until a
	// connection is accepted.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if nc, err := net.Dial("unix", sock); err == nil {
			nc.Close()
			return "nbd+unix:///?socket=" + sock, stop, nil
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("nbdkit did not start: %s", stderr.String())
		}
	}
}

// sameSparse checks that b holds a's bytes and that every hole of a is a
// hole of b.
func sameSparse(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 4<<20), make([]byte, 4<<20)
	for off := int64(0); ; off += int64(len(ba)) {
		na, ea := io.ReadFull(fa, ba)
		nb, _ := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return fmt.Errorf("contents differ within %d+%d", off, len(ba))
		}
		if ea != nil {
			break
		}
	}
	size, err := fa.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	for off := int64(0); off < size; {
		hole, err := unix.Seek(int(fa.Fd()), off, unix.SEEK_HOLE)
		if err != nil || hole >= size {
			break
		}
		data, err := unix.Seek(int(fa.Fd()), hole, unix.SEEK_DATA)
		if err != nil {
			data = size // no data after the hole
		}
		got, err := unix.Seek(int(fb.Fd()), hole, unix.SEEK_DATA)
		if err == nil && got < data {
			return fmt.Errorf("the source's hole [%d, %d) holds data at %d in the copy", hole, data, got)
		}
		off = data
	}
	return nil
}

// allocated is the bytes a file allocates on disk.
func allocated(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}
