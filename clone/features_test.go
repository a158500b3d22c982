package clone

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestReadHintPriority: a region read from the source is the next one
// background hydration copies.
func TestReadHintPriority(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 4<<20, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, 4<<20, 4096), blockdevtest.NewMem(t, MetadataSize(4<<20, 0), 4096), Options{NoHydration: true, BatchSize: 2})
	require.NoError(t, err)
	defer c.Close()
	buf := make([]byte, 4096)
	_, err = c.ReadAt(buf, 40*(64<<10)+8192) // region 40, unhydrated; data through region 41
	require.NoError(t, err)
	n, err := c.hyd.step(context.Background(), 2)
	require.NoError(t, err)
	require.EqualValues(t, 2, n)
	require.True(t, c.md.rangeHydrated(40, 41), "the hinted region was not hydrated first")
	require.False(t, c.md.test(0))
}

// TestCommitInterval: hydration progress is committed without a Flush.
func TestCommitInterval(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	c, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{NoHydration: true, CommitInterval: 5 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	_, err = c.WriteAt(make([]byte, 4096), 0) // hydrates region 0
	require.NoError(t, err)
	deadline := time.Now().Add(10 * time.Second)
	for c.Status().Commits == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.Positive(t, c.Status().Commits, "no commit within the deadline")
}

// TestCheckpoints: many commits fill the journal; checkpoints trim it and
// reopening recovers the same bitmap from checkpoint plus records.
func TestCheckpoints(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 8 << 20
	src, _ := newSource(t, size, 4096)
	dst := blockdevtest.NewMem(t, size, 4096)
	meta := blockdevtest.NewMem(t, MetadataSize(size, 4096), 4096)
	opts := Options{RegionSize: 4096, NoHydration: true, CommitInterval: -1}
	c, err := Create(src, dst, meta, opts)
	require.NoError(t, err)
	for i := range 600 {
		_, err := c.hyd.step(context.Background(), 1)
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, c.Flush())
		}
	}
	st := c.md.j.Stats()
	require.Positive(t, st.Checkpoints, "no checkpoint after 300 commits")
	hydrated := c.Status().Hydrated
	require.NoError(t, c.Close())
	c, err = Open(src, dst, meta, opts)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Check())
	require.Equal(t, hydrated, c.Status().Hydrated)
}

// TestUnsyncedCrash: a clone with metadata sync off that loses power
// cannot be opened (its hydration state is lost); a cleanly closed one
// can.
func TestUnsyncedCrash(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	src, _ := newSource(t, 1<<20, 4096)
	pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, blockdevtest.Policy{Mode: blockdevtest.Keep})
	dst := pc.NewDevice(t, "destination", 1<<20, 4096)
	meta := pc.NewDevice(t, "metadata", MetadataSize(1<<20, 0), 4096)
	opts := Options{NoMetadataSync: true, NoHydration: true}
	c, err := Create(src, dst, meta, opts)
	require.NoError(t, err)
	_, err = c.WriteAt(make([]byte, 8192), 0)
	require.NoError(t, err)
	require.NoError(t, c.Flush())
	require.NoError(t, c.Close())
	c, err = Open(src, dst, meta, opts) // clean close: fine
	require.NoError(t, err)
	require.EqualValues(t, 1, c.Status().Hydrated)
	_, err = c.WriteAt(make([]byte, 8192), 1<<19)
	require.NoError(t, err)
	require.NoError(t, c.Flush()) // no metadata: the region's bit is not durable
	after := pc.Cut()
	dst, meta = after[0], after[1]
	_ = c.Close()
	_, err = Open(src, dst, meta, opts)
	require.ErrorIs(t, err, ErrUnclean)
}

// TestHydrateOnReadConcurrent: concurrent readers of the same unhydrated
// regions with HydrateOnRead copy each region once and all see the source.
func TestHydrateOnReadConcurrent(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	srcMem, img := newSource(t, 1<<20, 4096)
	src := blockdevtest.NewFaulty(srcMem) // counts source reads
	c, err := Create(src, blockdevtest.NewMem(t, 1<<20, 4096), blockdevtest.NewMem(t, MetadataSize(1<<20, 0), 4096), Options{NoHydration: true, HydrateOnRead: true})
	require.NoError(t, err)
	defer c.Close()
	errc := make(chan error, 8)
	for w := range 8 {
		go func() {
			buf := make([]byte, 8192)
			for i := range 16 {
				off := int64((i*7+w)%16) * (64 << 10)
				if _, err := c.ReadAt(buf, off); err != nil {
					errc <- err
					return
				}
				if string(buf) != string(img[off:off+8192]) {
					errc <- blockdev.ErrIO
					return
				}
			}
			errc <- nil
		}()
	}
	for range 8 {
		require.NoError(t, <-errc)
	}
	require.EqualValues(t, 16, c.Status().Hydrated)
	require.Equal(t, 16, src.Calls(), "each region copied once")
}
