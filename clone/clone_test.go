package clone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// fillPattern writes a recognisable, never-zero pattern into p for the
// absolute offset off, so data read from the wrong place shows.
func fillPattern(p []byte, off int64, seed byte) {
	for i := range p {
		x := uint64(off+int64(i)) * 0x9E3779B97F4A7C15
		p[i] = byte(x>>56) | 1 ^ seed
	}
}

// newSource returns a Mem source of size bytes filled with a pattern, with
// some all-zero stretches (every third 32 KiB): every other one of them is
// a hole (Mem maps it so), the others are written zeros, so that
// hydration meets both the source map's holes and zeros it finds by
// reading, also in the small sources of the crash tests.
func newSource(t testing.TB, size int64, bs int) (*blockdev.Mem, []byte) {
	t.Helper()
	m, err := blockdev.NewMem(size, bs)
	require.NoError(t, err)
	img := make([]byte, size)
	fillPattern(img, 0, 0x5a)
	const zero, every = 32 << 10, 3 * 32 << 10
	for off := int64(0); off < size; off += every {
		clear(img[off:min(off+zero, size)])
	}
	_, err = m.WriteAt(img, 0)
	require.NoError(t, err)
	for off := int64(0); off < size; off += 2 * every {
		require.NoError(t, m.Discard(off, min(zero, size-off)))
	}
	return m, img
}

func TestConformanceMem(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		src, _ := newSource(t, 4<<20, 512)
		c, err := Create(blockdev.ReadOnly(src), blockdevtest.NewMem(t, 4<<20, 4096), blockdevtest.NewMem(t, MetadataSize(4<<20, 0), 512), Options{RegionSize: 64 << 10})
		require.NoError(t, err)
		return c
	})
}

func TestConformanceMemHydrateOnRead(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		src, _ := newSource(t, 1<<20, 4096)
		c, err := Create(src, blockdevtest.NewMem(t, 2<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 4096), 4096),
			Options{RegionSize: 4096, HydrateOnRead: true, NoHydration: true, NoDiscardPassdown: true})
		require.NoError(t, err)
		return c
	})
}

func TestConformanceFile(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		dir := t.TempDir()
		mk := func(name string, size int64) *blockdev.File {
			f, err := blockdev.Create(filepath.Join(dir, name), size, blockdev.FileOptions{})
			require.NoError(t, err)
			t.Cleanup(func() { _ = f.Close() })
			return f
		}
		src := mk("src", 4<<20)
		img := make([]byte, 4<<20)
		fillPattern(img, 0, 3)
		_, err := src.WriteAt(img, 0)
		require.NoError(t, err)
		c, err := Create(src, mk("dst", 4<<20), mk("meta", MetadataSize(4<<20, 0)), Options{BatchSize: 4})
		require.NoError(t, err)
		return c
	})
}

func TestCreateOptions(t *testing.T) {
	src := blockdevtest.NewMem(t, 1<<20, 4096)
	meta := blockdevtest.NewMem(t, 1<<20, 4096)
	for _, rs := range []int64{1000, 2048, 3 << 12, 2 << 30} {
		_, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), meta, Options{RegionSize: rs})
		require.ErrorIs(t, err, ErrOptions, "region size %d", rs)
	}
	_, err := Create(src, blockdevtest.NewMem(t, 512<<10, 4096), meta, Options{})
	require.ErrorIs(t, err, ErrOptions, "small destination")
	_, err = Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, 8192, 4096), Options{})
	require.ErrorIs(t, err, ErrOptions, "small metadata")
}

func TestGeometryMismatch(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	dst := blockdevtest.NewMem(t, 1<<20, 4096)
	meta := blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096)
	c, err := Create(src, dst, meta, Options{NoHydration: true})
	require.NoError(t, err)
	require.NoError(t, c.Close())

	_, err = Open(src, dst, meta, Options{RegionSize: 128 << 10})
	var ge *GeometryError
	require.ErrorAs(t, err, &ge)
	require.ErrorIs(t, err, ErrGeometry)
	require.Equal(t, "region size", ge.Field)

	_, err = Open(blockdevtest.NewMem(t, 2<<20, 4096), dst, meta, Options{})
	require.ErrorIs(t, err, ErrGeometry)
	_, err = Open(src, blockdevtest.NewMem(t, 2<<20, 4096), meta, Options{})
	require.ErrorIs(t, err, ErrGeometry)
	_, err = Open(src, dst, blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{})
	require.ErrorIs(t, err, ErrCorrupt, "blank metadata")

	c, err = Open(src, dst, meta, Options{RegionSize: 64 << 10})
	require.NoError(t, err)
	require.NoError(t, c.Check())
	require.NoError(t, c.Close())
	require.ErrorIs(t, c.Close(), blockdev.ErrClosed)
}

// TestHydrateAndReopen hydrates fully in the background, checks the
// destination alone holds the source, and reopens.
func TestHydrateAndReopen(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 3<<20 + 8192 // a short last region
	src, img := newSource(t, size, 4096)
	dst := blockdevtest.NewMem(t, size, 4096)
	meta := blockdevtest.NewMem(t, MetadataSize(size, 0), 4096)
	var reports []Status
	c, err := Create(src, dst, meta, Options{Progress: func(s Status) { reports = append(reports, s) }})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	st := c.Status()
	require.Equal(t, Hydrated, st.State)
	require.Equal(t, st.Regions, st.Hydrated)
	require.Positive(t, st.BytesSkipped, "zero regions are discarded, not copied")
	require.Equal(t, int64(size), st.BytesCopied+st.BytesSkipped)
	require.NoError(t, c.Close())
	require.NotEmpty(t, reports)
	require.Equal(t, Hydrated, reports[len(reports)-2].State, "the dispatcher reports completion")

	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got), "destination differs from source")

	c, err = Open(src, dst, meta, Options{})
	require.NoError(t, err)
	select {
	case <-c.Done():
	default:
		t.Fatal("reopened clone is not done")
	}
	require.NoError(t, c.Check())
	require.NoError(t, c.Close())
}

// TestFlushNoChange: a Flush with nothing hydrated since the last commit
// writes no metadata.
func TestFlushNoChange(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	dst := blockdevtest.NewMem(t, 1<<20, 4096)
	meta := blockdevtest.NewFaulty(blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096))
	c, err := Create(src, dst, meta, Options{NoHydration: true, CommitInterval: -1})
	require.NoError(t, err)
	defer c.Close()
	p := make([]byte, 64<<10)
	_, err = c.WriteAt(p, 0) // hydrates region 0
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	calls := meta.Calls()
	require.NoError(t, c.Flush())
	_, err = c.WriteAt(p[:4096], 0) // hydrated region: no metadata
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	require.Equal(t, calls, meta.Calls(), "flush with nothing new touched the metadata")
	require.EqualValues(t, 1, c.Status().Commits)
}

// TestPauseResume: with hydration off nothing is copied; Resume finishes.
func TestPauseResume(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 2<<20, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, 2<<20, 4096), blockdevtest.NewMem(t, MetadataSize(2<<20, 0), 4096), Options{NoHydration: true, RateLimit: 64 << 20})
	require.NoError(t, err)
	defer c.Close()
	require.Equal(t, Paused, c.Status().State)
	require.Zero(t, c.Status().Hydrated)
	c.SetThreshold(2)
	c.Resume()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx), "%v", c.Status())
	c.Pause()
	require.Equal(t, Hydrated, c.Status().State)
}

func TestWaitClosed(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{NoHydration: true})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- c.Wait(context.Background()) }()
	require.NoError(t, c.Close())
	require.ErrorIs(t, <-errc, blockdev.ErrClosed)
}

// TestConcurrentHydrationAndWrites races user writes of every alignment
// against background hydration and checks the result against a model.
func TestConcurrentHydrationAndWrites(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	seed := blockdevtest.Seed(t)
	const size = 4 << 20
	src, img := newSource(t, size, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, size, 4096), blockdevtest.NewMem(t, MetadataSize(size, 16<<10), 4096),
		Options{RegionSize: 16 << 10, BatchSize: 3, HydrationThreshold: 9})
	require.NoError(t, err)
	defer c.Close()
	const workers = 4
	errc := make(chan error, workers)
	span := int64(size / workers)
	for w := range workers {
		go func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			base := int64(w) * span
			for range 150 {
				off := base + rng.Int64N(span/4096)*4096
				n := min(1+rng.Int64N(12), (base+span-off)/4096) * 4096
				p := make([]byte, n)
				fillPattern(p, off, byte(w+1))
				var err error
				if rng.IntN(5) == 0 {
					err = c.Discard(off, n)
					clear(p)
				} else {
					_, err = c.WriteAt(p, off)
				}
				if err != nil {
					errc <- err
					return
				}
				copy(img[off:], p)
			}
			errc <- nil
		}()
	}
	for range workers {
		require.NoError(t, <-errc)
	}
	got := make([]byte, size)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got), "seed %d", seed)
	require.NoError(t, c.Check())
}

var errTest = errors.New("test fault")

func ExampleStatus() {
	s := Status{State: Hydrating, Regions: 100, Hydrated: 25, BytesCopied: 1 << 20, Rate: 2e6, ETA: 3 * time.Second,
		Window: 4 << 20, InFlightBytes: 3 << 20, SourceRate: 150e6, SourceLatency: 20 * time.Millisecond}
	fmt.Println(s)
	// Output: hydrating 25/100 regions (25.0%), 1048576 B copied, 0 B skipped, 2.0 MB/s, ETA 3s, window 4096 KiB (3072 KiB in flight), source 150.0 MB/s at 20ms
}

// TestHotPathAllocs: reads and writes of hydrated regions, and reads of
// unhydrated ones, allocate nothing.
func TestHotPathAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{NoHydration: true})
	require.NoError(t, err)
	defer c.Close()
	p := make([]byte, 64<<10)
	_, err = c.WriteAt(p, 0) // hydrates region 0
	require.NoError(t, err)
	buf := make([]byte, 4096)
	require.Zero(t, testing.AllocsPerRun(100, func() { _, _ = c.ReadAt(buf, 4096) }), "read of a hydrated region")
	require.Zero(t, testing.AllocsPerRun(100, func() { _, _ = c.WriteAt(buf, 8192) }), "write to a hydrated region")
	require.Zero(t, testing.AllocsPerRun(100, func() { _, _ = c.ReadAt(buf, 512<<10) }), "read of an unhydrated region")
}

// A clone made from a source with 4 KiB blocks reopens on the same image
// served with 512-byte blocks (an NBD server that lowered its advertised
// minimum), reading the same data; the reverse, a larger block than
// recorded, is a geometry mismatch.
func TestSourceBlockSizeShrinks(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	dst := blockdevtest.NewMem(t, 1<<20, 4096)
	meta := blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096)
	c, err := Create(src, dst, meta, Options{NoHydration: true})
	require.NoError(t, err)
	want := blockdevtest.ReadAll(t, c)
	require.NoError(t, c.Close())

	small := blockdevtest.NewMem(t, 1<<20, 512)
	_, err = small.WriteAt(blockdevtest.ReadAll(t, src), 0)
	require.NoError(t, err)
	c, err = Open(small, dst, meta, Options{NoHydration: true})
	require.NoError(t, err)
	require.Equal(t, want, blockdevtest.ReadAll(t, c))
	require.NoError(t, c.Check())
	require.NoError(t, c.Close())

	src512, _ := newSource(t, 1<<20, 512)
	meta2 := blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096)
	c, err = Create(src512, blockdevtest.NewMem(t, 1<<20, 512), meta2, Options{NoHydration: true})
	require.NoError(t, err)
	require.NoError(t, c.Close())
	_, err = Open(src, blockdevtest.NewMem(t, 1<<20, 512), meta2, Options{})
	var ge *GeometryError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, "source block size", ge.Field)
}
