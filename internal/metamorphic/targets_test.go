package metamorphic

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/exception"
	"github.com/blocksnap/blocksnap/nbd"
	"github.com/blocksnap/blocksnap/snapshot"
)

// config is one configuration of every target, drawn from the seed.
type config struct {
	Size      int64 // bytes of every device under test
	BlockSize int   // 512 or 4096
	// exception
	ExcChunk int64
	// snapshot
	StoreChunk     int
	CommitInterval time.Duration // also clone's; negative: commit on Flush only
	OriginBuffer   int64         // negative: off
	// clone
	RegionSize int64
	BatchSize  int
	// SourceLatency is the clone source's added read latency.
	SourceLatency time.Duration
}

func (c config) String() string {
	return fmt.Sprintf("size=%d bs=%d exception-chunk=%d store-chunk=%d commit-interval=%v origin-buffer=%d clone-region=%d clone-batch=%d source-latency=%v",
		c.Size, c.BlockSize, c.ExcChunk, c.StoreChunk, c.CommitInterval, c.OriginBuffer, c.RegionSize, c.BatchSize, c.SourceLatency)
}

func drawConfig(rng *rand.Rand) config {
	pick := func(xs ...int64) int64 { return xs[rng.IntN(len(xs))] }
	c := config{Size: pick(512<<10, 1<<20), BlockSize: int(pick(512, 4096))}
	c.ExcChunk = pick(4096, 8192, 16384)
	if c.BlockSize == 512 {
		c.ExcChunk = pick(512, 1024, 4096, 8192)
	}
	c.StoreChunk = int(pick(4096, 16384, 65536))
	c.CommitInterval = time.Duration(pick(int64(time.Millisecond), int64(20*time.Millisecond), -1))
	c.OriginBuffer = pick(-1, 0, 64<<10)
	c.RegionSize = pick(4096, 16384, 65536)
	if c.RegionSize < int64(c.BlockSize) {
		c.RegionSize = int64(c.BlockSize)
	}
	c.BatchSize = int(pick(1, 4, 32))
	c.SourceLatency = time.Duration(pick(0, int64(20*time.Microsecond), int64(200*time.Microsecond)))
	return c
}

// target is one Device the stream runs against.
type target struct {
	name string
	// open makes a fresh, zero-filled device for cfg. The device is closed
	// with cleanup (which also checks the engine when it has a Check), and
	// skip, when set, says why this target cannot run here.
	open func(t *testing.T, cfg config) (dev blockdev.Device, cleanup func() error, skip string)
}

// targets is the list of every Device in the repository the stream runs on;
// each engine volume is also run through the NBD client and server.
func targets() []target {
	base := []target{
		{"mem", openMem},
		{"file", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) { return openFile(t, cfg, false) }},
		{"file-direct", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) { return openFile(t, cfg, true) }},
		{"uring", openURing},
		{"exception-origin/transient", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
			return openException(t, cfg, false, false)
		}},
		{"exception-origin/persistent", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
			return openException(t, cfg, true, false)
		}},
		{"exception-snapshot/persistent", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
			return openException(t, cfg, true, true)
		}},
		{"store-origin", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) { return openStore(t, cfg, 0) }},
		{"store-clone", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) { return openStore(t, cfg, 1) }},
		{"store-clone-of-clone", func(t *testing.T, cfg config) (blockdev.Device, func() error, string) { return openStore(t, cfg, 2) }},
		{"clone-hydrating", openClone},
	}
	all := append([]target(nil), base...)
	for _, b := range base {
		all = append(all, target{name: "nbd(" + b.name + ")", open: overNBD(b.open)})
	}
	return all
}

func openMem(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
	m := blockdevtest.NewMem(t, cfg.Size, cfg.BlockSize)
	return m, m.Close, ""
}

func openFile(t *testing.T, cfg config, direct bool) (blockdev.Device, func() error, string) {
	f, err := blockdev.Create(filepath.Join(t.TempDir(), "dev"), cfg.Size, blockdev.FileOptions{BlockSize: cfg.BlockSize, Direct: direct})
	if err != nil {
		if direct {
			return nil, nil, fmt.Sprintf("O_DIRECT refused here: %v", err)
		}
		t.Fatal(err)
	}
	return f, f.Close, ""
}

func openURing(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
	u, err := blockdev.CreateURing(filepath.Join(t.TempDir(), "dev"), cfg.Size, blockdev.URingOptions{FileOptions: blockdev.FileOptions{BlockSize: cfg.BlockSize}})
	if errors.Is(err, blockdev.ErrNotSupported) {
		return nil, nil, fmt.Sprintf("io_uring unsupported here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return u, u.Close, ""
}

// openException returns an origin with one snapshot attached, or (onSnap)
// the snapshot itself, taken of the zero-filled origin.
func openException(t *testing.T, cfg config, persistent, onSnap bool) (blockdev.Device, func() error, string) {
	o, err := exception.NewOrigin(blockdevtest.NewMem(t, cfg.Size, cfg.BlockSize), exception.OriginOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cow := blockdevtest.NewMem(t, 3*cfg.Size, cfg.BlockSize)
	s, err := o.CreateSnapshot(cow, exception.Options{ChunkSize: cfg.ExcChunk, Persistent: persistent})
	if err != nil {
		t.Fatal(err)
	}
	cleanup := func() error {
		if _, err := s.Check(); err != nil {
			return fmt.Errorf("snapshot check: %w", err)
		}
		return o.Close()
	}
	if onSnap {
		return s, cleanup, ""
	}
	return o, cleanup, ""
}

// openStore returns the shared store's origin (depth 0), a clone of a
// snapshot of it (1), or a clone of such a clone (2).
func openStore(t *testing.T, cfg config, depth int) (blockdev.Device, func() error, string) {
	origin := blockdevtest.NewMem(t, cfg.Size, cfg.BlockSize)
	store := blockdevtest.NewMem(t, 4*cfg.Size+(4<<20), cfg.BlockSize)
	s, err := snapshot.Format(origin, store, snapshot.Options{ChunkSize: int64(cfg.StoreChunk), CommitInterval: cfg.CommitInterval, OriginBuffer: cfg.OriginBuffer})
	if err != nil {
		t.Fatal(err)
	}
	v := s.Origin()
	if depth > 0 {
		snap, err := s.CreateSnapshot("base", v)
		if err != nil {
			t.Fatal(err)
		}
		v, err = s.CreateClone("clone", snap)
		if err != nil {
			t.Fatal(err)
		}
	}
	if depth > 1 {
		v, err = s.CreateClone("clone2", v)
		if err != nil {
			t.Fatal(err)
		}
	}
	cleanup := func() error {
		if err := s.Check(); err != nil {
			return fmt.Errorf("store check: %w", err)
		}
		return s.Close()
	}
	return v, cleanup, ""
}

// openClone returns a clone hydrating in the background from a slow,
// zero-filled source.
func openClone(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
	src := blockdevtest.NewDelayed(blockdevtest.NewMem(t, cfg.Size, cfg.BlockSize), blockdevtest.DelayOptions{ReadLatency: cfg.SourceLatency})
	dst := blockdevtest.NewMem(t, cfg.Size, cfg.BlockSize)
	meta := blockdevtest.NewMem(t, clone.MetadataSize(cfg.Size, cfg.RegionSize), cfg.BlockSize)
	ci := cfg.CommitInterval
	if ci < 0 {
		ci = 0
	}
	c, err := clone.Create(src, dst, meta, clone.Options{RegionSize: cfg.RegionSize, BatchSize: cfg.BatchSize, CommitInterval: ci})
	if err != nil {
		t.Fatal(err)
	}
	cleanup := func() error {
		if err := c.Check(); err != nil {
			return fmt.Errorf("clone check: %w", err)
		}
		return c.Close()
	}
	return c, cleanup, ""
}

// overNBD exports what open makes through an NBD server on a loopback port
// and returns a client of it.
func overNBD(open func(*testing.T, config) (blockdev.Device, func() error, string)) func(*testing.T, config) (blockdev.Device, func() error, string) {
	return func(t *testing.T, cfg config) (blockdev.Device, func() error, string) {
		dev, closeDev, skip := open(t, cfg)
		if skip != "" {
			return nil, nil, skip
		}
		srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "d", Device: dev})
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, stop := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ctx, l) }()
		c, err := nbd.Dial(context.Background(), nbd.URI(l.Addr(), "d"))
		if err != nil {
			stop()
			<-served
			t.Fatal(err)
		}
		cleanup := func() error {
			errs := []error{c.Close()}
			stop()
			errs = append(errs, <-served, closeDev())
			return errors.Join(errs...)
		}
		return c, cleanup, ""
	}
}
