// Clone: hydrate a local disk from a remote NBD image in the background
// (the dm-clone model), using the disk at once, with a progress callback.
//
//	go run ./examples/clone                                  # a demo source served from this process
//	nbdkit -r file golden.img &                               # or any NBD server:
//	go run ./examples/clone -source nbd://127.0.0.1:10809
//	go run ./examples/clone -source nbd://127.0.0.1:10809/NAME -dir /var/tmp/clone
//
// The clone is a blockdev.Device from the first moment: reads of regions
// not yet copied go to the source, writes go to the destination, and a
// background copier fills in the rest. Restarting resumes where it stopped.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/nbd"
)

func main() {
	source := flag.String("source", "", "NBD URI of the source image (empty: serve a 32 MiB demo image from this process)")
	dir := flag.String("dir", "", "directory for dest.img and meta (default: a temporary one, removed on exit)")
	flag.Parse()
	if *dir == "" {
		d, err := os.MkdirTemp("", "blocksnap-clone")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout, *dir, *source); err != nil {
		log.Fatal(err)
	}
}

// lockedWriter serialises the progress callback (a background goroutine)
// with the rest of the output.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func run(ctx context.Context, out io.Writer, dir, source string) error {
	w := &lockedWriter{w: out}
	if source == "" {
		uri, stop, err := demoSource(ctx)
		if err != nil {
			return err
		}
		defer stop()
		source = uri
	}
	src, err := nbd.Dial(ctx, source)
	if err != nil {
		return err
	}
	defer src.Close()
	size := src.Size()
	fmt.Fprintf(w, "source %s: %d MiB\n", source, size>>20)

	dest, err := blockdev.Create(filepath.Join(dir, "dest.img"), size, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer dest.Close()
	meta, err := blockdev.Create(filepath.Join(dir, "meta"), clone.MetadataSize(size, 0), blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer meta.Close()

	c, err := clone.Create(src, dest, meta, clone.Options{
		RateLimit:        16 << 20, // be gentle with the network; user I/O is never limited
		ProgressInterval: 100 * time.Millisecond,
		Progress: func(s clone.Status) {
			fmt.Fprintf(w, "  %-9s %5.1f%%  %3d MiB copied, %3d MiB skipped (zeros)\n", s.State,
				float64(s.Hydrated)*100/float64(max(s.Regions, 1)), s.BytesCopied>>20, s.BytesSkipped>>20)
		},
	})
	if err != nil {
		return err
	}

	// The clone is usable at once: write to it while it hydrates.
	note := make([]byte, 4096)
	copy(note, "written before hydration finished")
	if _, err := c.WriteAt(note, 4<<20); err != nil {
		c.Close()
		return err
	}
	if err := c.Wait(ctx); err != nil {
		c.Close()
		return err
	}
	st := c.Status()
	if err := c.Close(); err != nil {
		return err
	}
	fmt.Fprintf(w, "hydrated %d regions of %d KiB: %d MiB copied, %d MiB skipped\n",
		st.Regions, st.RegionSize>>10, st.BytesCopied>>20, st.BytesSkipped>>20)

	// The destination alone now holds the volume: the source's data with
	// our write laid over it.
	if err := verify(src, dest, note, 4<<20); err != nil {
		return err
	}
	fmt.Fprintln(w, "verified: dest.img equals the source, plus the write made during hydration")
	return nil
}

// verify compares dest with src, except for want at off.
func verify(src, dest blockdev.Device, want []byte, off int64) error {
	a, b := make([]byte, 1<<20), make([]byte, 1<<20)
	for pos := int64(0); pos < src.Size(); pos += int64(len(a)) {
		n := min(int64(len(a)), src.Size()-pos)
		if _, err := src.ReadAt(a[:n], pos); err != nil {
			return err
		}
		if _, err := dest.ReadAt(b[:n], pos); err != nil {
			return err
		}
		if off >= pos && off < pos+n {
			copy(a[off-pos:], want)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			return fmt.Errorf("dest.img differs from the source in the MiB at %d", pos)
		}
	}
	return nil
}

// demoSource serves a 32 MiB image (data with a zero hole) over NBD from
// this process, standing in for nbdkit or a remote server.
func demoSource(ctx context.Context) (string, func(), error) {
	m, err := blockdev.NewMem(32<<20, 512)
	if err != nil {
		return "", nil, err
	}
	rng := rand.New(rand.NewPCG(7, 7))
	img := make([]byte, 32<<20)
	for i := range img[:16<<20] {
		img[i] = byte(rng.Uint32())
	}
	if _, err := m.WriteAt(img, 0); err != nil {
		return "", nil, err
	}
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "golden", Device: m, ReadOnly: true})
	if err != nil {
		return "", nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	done := make(chan struct{})
	go func() {
		srv.Serve(ctx, l)
		close(done)
	}()
	return nbd.URI(l.Addr(), "golden"), func() { srv.Close(); <-done }, nil
}
