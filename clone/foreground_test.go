package clone

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// gatedSource holds every read longer than one region (a background copy's;
// user I/O reads one region at most here) until open is closed, and
// reports each such read on started. It hides the Mem's allocation map, so
// every region is copied.
type gatedSource struct {
	blockdev.Device
	region  int
	started chan [2]int64 // offset and length of a held read
	open    chan struct{}
	once    sync.Once
}

func (s *gatedSource) ReadAt(p []byte, off int64) (int, error) {
	if len(p) > s.region {
		select {
		case s.started <- [2]int64{off, int64(len(p))}:
		default:
		}
		<-s.open
	}
	return s.Device.ReadAt(p, off)
}

func (s *gatedSource) release() { s.once.Do(func() { close(s.open) }) }

// TestForegroundRobsBackgroundCopy: a partial write, a hydrate-on-read
// read and a partial discard of regions that a background copy has
// claimed, and is still reading from the source, complete while that read
// is held: each takes its region from the copy and reads the source
// itself. When the copy's read returns, it leaves those regions alone, and
// the destination holds the source with the user's changes.
func TestForegroundRobsBackgroundCopy(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size, region = 1 << 20, 16 << 10
	mem, img := newSource(t, size, 4096)
	src := &gatedSource{Device: mem, region: region, started: make(chan [2]int64, 1), open: make(chan struct{})}
	dst := blockdevtest.NewMem(t, size, 4096)
	opts := Options{RegionSize: region, BatchSize: 8, HydrationThreshold: 8, HydrateOnRead: true}
	c, err := Create(src, dst, blockdevtest.NewMem(t, MetadataSize(size, region), 4096), opts)
	require.NoError(t, err)
	defer c.Close()
	defer src.release() // first: a failed test must not leave the copy held

	var held [2]int64
	select {
	case held = <-src.started:
	case <-time.After(30 * time.Second):
		t.Fatal("no background copy read the source")
	}
	require.GreaterOrEqual(t, held[1], int64(3*region), "a copy of at least three regions")
	want := bytes.Clone(img)
	done := make(chan error, 1)
	go func() {
		// Into the copy's first, second and third regions.
		w := bytes.Repeat([]byte{0xc3}, 4096)
		at := held[0] + 4096
		if _, err := c.WriteAt(w, at); err != nil {
			done <- err
			return
		}
		copy(want[at:], w)
		got := make([]byte, 8192)
		at = held[0] + region + 8192
		if _, err := c.ReadAt(got, at); err != nil {
			done <- err
			return
		}
		if !bytes.Equal(got, img[at:at+8192]) {
			done <- blockdev.ErrIO
			return
		}
		at = held[0] + 2*region
		if err := c.Discard(at, 4096); err != nil {
			done <- err
			return
		}
		clear(want[at : at+4096])
		done <- nil
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("user I/O waited for the background copy's source read")
	}
	// The three regions are hydrated while the copy still holds its read.
	for k := int64(0); k < 3; k++ {
		require.True(t, c.md.test(uint64((held[0]+k*region)/region)), "region %d of the copy", k)
	}
	src.release()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	require.NoError(t, c.Check())
	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "destination differs: a copy overwrote a robbed region")
}

// TestCopyAllocs: a background copy (claim, source read, destination
// write, release) allocates nothing once its flight and buffer are pooled.
func TestCopyAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	blockdevtest.CheckLeaks(t)
	const size, region = 16 << 20, 4096
	src, _ := newSource(t, size, 4096)
	dst := blockdevtest.NewMem(t, size, 4096)
	// A Mem allocates a page when it is first written: write them all.
	junk := make([]byte, size)
	fillPattern(junk, 0, 0x77)
	_, err := dst.WriteAt(junk, 0)
	require.NoError(t, err)
	opts := Options{RegionSize: region, NoHydration: true, CommitInterval: -1, NoDiscardPassdown: true}
	c, err := Create(hideMap{src}, dst, blockdevtest.NewMem(t, MetadataSize(size, region), 4096), opts)
	require.NoError(t, err)
	defer c.Close()
	ctx := context.Background()
	_, err = c.hyd.step(ctx, 16) // warm the pools
	require.NoError(t, err)
	var bad error
	allocs := testing.AllocsPerRun(100, func() {
		if n, err := c.hyd.step(ctx, 16); err != nil || n != 16 {
			bad = fmt.Errorf("step: %d regions, %v", n, err)
		}
	})
	require.NoError(t, bad)
	require.Zero(t, allocs, "allocations per copy of 16 regions")
}

// hideMap hides a device's allocation map: every region is copied.
type hideMap struct{ blockdev.Device }
