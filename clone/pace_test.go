package clone

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// mappedSource is a source that can map its allocation (through the Mem
// beneath) and counts what is read from it; mapErr, if set, fails the map
// from its n-th call on.
type mappedSource struct {
	blockdev.Device
	mem      *blockdev.Mem
	read     atomic.Int64 // bytes read
	maps     atomic.Int64 // MapAllocation calls
	mapErrAt int64
}

func (s *mappedSource) ReadAt(p []byte, off int64) (int, error) {
	s.read.Add(int64(len(p)))
	return s.Device.ReadAt(p, off)
}

func (s *mappedSource) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if k := s.maps.Add(1); s.mapErrAt > 0 && k >= s.mapErrAt {
		return 0, blockdev.Allocated, errTest
	}
	return s.mem.MapAllocation(off, n)
}

// sparseSource returns a Mem of size bytes whose data lies in extents of
// random length and position, the rest holes, plus its image and the bytes
// of data. The seed is logged.
func sparseSource(t *testing.T, size int64) (*blockdev.Mem, []byte, int64) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 18))
	m := blockdevtest.NewMem(t, size, 4096)
	img := make([]byte, size)
	var data int64
	for off := int64(0); off < size; {
		n := min(4096*(1+rng.Int64N(96)), size-off)
		if rng.IntN(3) == 0 {
			fillPattern(img[off:off+n], off, 0x33)
			_, err := m.WriteAt(img[off:off+n], off)
			require.NoError(t, err)
			data += n
		}
		off += n
	}
	return m, img, data
}

// TestHoleSkipping: regions wholly inside holes of a source that maps its
// allocation are hydrated without being read, and stay holes in the
// destination; the destination equals the source.
func TestHoleSkipping(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 8 << 20
	mem, img, data := sparseSource(t, size)
	src := &mappedSource{Device: mem, mem: mem}
	dst := blockdevtest.NewMem(t, size, 4096)
	// Dirty the destination: skipped holes must be discarded, not assumed.
	junk := make([]byte, size)
	fillPattern(junk, 0, 0x77)
	_, err := dst.WriteAt(junk, 0)
	require.NoError(t, err)
	c, err := Create(blockdev.ReadOnly(src), dst, blockdevtest.NewMem(t, MetadataSize(size, 16<<10), 4096), Options{RegionSize: 16 << 10})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	st := c.Status()
	require.NoError(t, c.Close())

	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got), "destination differs from the source")
	// Data regions are read whole: at most the data plus one region per
	// data extent's two partial ends.
	extents := countExtents(t, mem)
	require.LessOrEqual(t, src.read.Load(), data+int64(extents)*2*(16<<10), "holes were read")
	require.Positive(t, st.BytesSkipped)
	// Every region that is a hole in the source is a hole in the
	// destination.
	for off := int64(0); off < size; off += 16 << 10 {
		n, state, err := mem.MapAllocation(off, 16<<10)
		require.NoError(t, err)
		if state == blockdev.Hole && n == 16<<10 {
			n, state, err = dst.MapAllocation(off, 16<<10)
			require.NoError(t, err)
			require.Equal(t, blockdev.Hole, state, "region at %d", off)
			require.EqualValues(t, 16<<10, n)
		}
	}
}

func countExtents(t *testing.T, m *blockdev.Mem) int {
	var k int
	for off := int64(0); off < m.Size(); {
		n, _, err := m.MapAllocation(off, m.Size()-off)
		require.NoError(t, err)
		off += n
		k++
	}
	return k
}

// TestHoleSkippingMapFails: a source whose map fails part way is still
// hydrated completely (the rest is copied).
func TestHoleSkippingMapFails(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 4 << 20
	mem, img, _ := sparseSource(t, size)
	src := &mappedSource{Device: mem, mem: mem, mapErrAt: 3}
	dst := blockdevtest.NewMem(t, size, 4096)
	c, err := Create(src, dst, blockdevtest.NewMem(t, MetadataSize(size, 0), 4096), Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	require.NoError(t, c.Close())
	require.ErrorIs(t, c.hyd.smap.failed(), errTest)
	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got))
}

// TestSetRateLimitWhileRunning: a hydration limited to a crawl finishes
// once the limit is lifted while the dispatcher waits for tokens.
func TestSetRateLimitWhileRunning(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 4 << 20
	src, img := newSource(t, size, 4096)
	dst := blockdevtest.NewMem(t, size, 4096)
	c, err := Create(src, dst, blockdevtest.NewMem(t, MetadataSize(size, 0), 4096), Options{RateLimit: 16 << 10})
	require.NoError(t, err)
	defer c.Close()
	require.EqualValues(t, 16<<10, c.Status().RateLimit)
	// At 16 KiB/s this would take minutes; wait until the dispatcher is
	// waiting on the limiter.
	deadline := time.Now().Add(10 * time.Second)
	for c.Status().BytesCopied == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	c.SetRateLimit(0)
	require.Zero(t, c.Status().RateLimit)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx), "%v", c.Status())
	got := make([]byte, size)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got))
}

// TestRateLimitHonoured: the bytes copied never exceed the burst plus the
// rate times the time elapsed (a bound that a slow machine only makes
// easier to meet).
func TestRateLimitHonoured(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 16 << 20
	const limit = 2 << 20
	m := blockdevtest.NewMem(t, size, 4096)
	buf := make([]byte, size)
	fillPattern(buf, 0, 1)
	_, err := m.WriteAt(buf, 0)
	require.NoError(t, err)
	start := time.Now()
	c, err := Create(m, blockdevtest.NewMem(t, size, 4096), blockdevtest.NewMem(t, MetadataSize(size, 0), 4096), Options{RateLimit: limit})
	require.NoError(t, err)
	defer c.Close()
	for range 20 {
		time.Sleep(10 * time.Millisecond)
		st := c.Status()
		el := time.Since(start).Seconds()
		require.LessOrEqual(t, float64(st.BytesCopied), float64(c.bufSize)+limit*el, "after %.3fs: %v", el, st)
	}
}

// TestWindowFollowsSource: hydrating from a source with latency, the
// status reports the measured latency and rate and a window within its
// bounds, and the hydration completes.
func TestWindowFollowsSource(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 8 << 20
	mem, img := newSource(t, size, 4096)
	src := blockdevtest.NewDelayed(mem, blockdevtest.DelayOptions{ReadLatency: 2 * time.Millisecond})
	var mu sync.Mutex
	var seen []Status
	c, err := Create(src, blockdevtest.NewMem(t, size, 4096), blockdevtest.NewMem(t, MetadataSize(size, 0), 4096), Options{
		Progress:         func(s Status) { mu.Lock(); seen = append(seen, s); mu.Unlock() },
		ProgressInterval: time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	st := c.Status()
	got := make([]byte, size)
	_, err = c.ReadAt(got, 0)
	require.NoError(t, err)
	require.NoError(t, c.Close())
	require.True(t, bytes.Equal(img, got))
	require.GreaterOrEqual(t, st.SourceLatency, 2*time.Millisecond, "%v", st)
	require.Positive(t, st.SourceRate)
	require.GreaterOrEqual(t, st.Window, c.geo.RegionSize)
	require.LessOrEqual(t, st.Window, int64(st.Threshold)*c.geo.RegionSize)
	mu.Lock()
	defer mu.Unlock()
	var sawFlight bool
	for _, s := range seen {
		// The window moves under copies already issued, but never above
		// the cap.
		require.LessOrEqual(t, s.InFlightBytes, int64(s.Threshold)*c.geo.RegionSize, "%v", s)
		sawFlight = sawFlight || s.InFlightBytes > 0
	}
	require.True(t, sawFlight, "no progress report saw a copy in flight")
}

// TestPacerWindow checks the window arithmetic on synthetic samples: the
// bulk window is bulkGain times the bandwidth-delay product, the yielding
// one yieldGain times it plus a batch; both keep their bounds.
func TestPacerWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	p := newPacer(64<<10, 64<<20, 4<<20, t0)
	require.EqualValues(t, 4<<20, p.window(false), "before any sample")
	require.EqualValues(t, 64<<10, p.window(true), "before any sample, yielding")
	// 1 MiB copies taking 10 ms each, one issued every 1.25 ms: 8 in
	// flight, 800 MiB/s.
	now := steady(&p, t0, 400)
	require.InEpsilon(t, 800<<20, p.rate(), 0.05)
	require.Equal(t, 10*time.Millisecond, p.latency())
	bdp := p.rate() * p.latency().Seconds()
	require.InDelta(t, bulkGain*bdp, float64(p.window(false)), 1)
	ybdp := int64(yieldGain * bdp)
	require.InDelta(t, ybdp+p.yieldBatch(ybdp), p.window(true), 1)
	// A slow sample does not raise the latency estimate or lower the rate.
	r := p.rate()
	p.sample(now.Add(time.Second), p.issue(now), 1<<20)
	require.Equal(t, 10*time.Millisecond, p.latency())
	require.GreaterOrEqual(t, p.rate(), r)
	// Bounds.
	q := newPacer(64<<10, 1<<20, 4<<20, t0)
	require.EqualValues(t, 1<<20, q.window(false))
	q = newPacer(64<<10, 1<<20, 4096, t0)
	q.sample(t0.Add(time.Second), q.issue(t0), 4096)
	require.EqualValues(t, 64<<10, q.window(false), "at least a region")
	require.EqualValues(t, int64(yieldGain*4096)+64<<10, q.window(true), "the product plus a batch of a region")
	// Estimates forget: two bucket spans later only new samples count.
	later := now.Add(2*bwSpan + time.Millisecond)
	p.restart(later.Add(-20 * time.Millisecond))
	p.sample(later, p.issue(later.Add(-20*time.Millisecond)), 1<<20)
	require.Less(t, p.rate(), r)
}

// steady feeds p n copies of 1 MiB taking 10 ms each, one issued every
// 1.25 ms from t0, each completion before the issue due at the same time;
// it returns the time after the last.
func steady(p *pacer, t0 time.Time, n int) time.Time {
	const every = 10 * time.Millisecond / 8
	var flying []stamp
	now := t0
	for k := range n + 8 {
		now = t0.Add(time.Duration(k) * every)
		if len(flying) == 8 || (k >= n && len(flying) > 0) {
			p.sample(now, flying[0], 1<<20)
			flying = flying[1:]
		}
		if k < n {
			flying = append(flying, p.issue(now))
		}
	}
	return now
}

// TestPacerStartup: a full initial window whose copies complete together
// after one latency gives a rate estimate of the whole window over that
// latency, not of the first copy over it, and the window never drops
// below the initial one while that first flight comes back.
func TestPacerStartup(t *testing.T) {
	t0 := time.Unix(1000, 0)
	p := newPacer(64<<10, 64<<20, 16<<20, t0)
	var flying []stamp
	for range 16 {
		flying = append(flying, p.issue(t0))
	}
	for i, s := range flying {
		// 10 ms of latency, then 1 MiB every 0.1 ms: 10 GB/s.
		p.sample(t0.Add(10*time.Millisecond+time.Duration(i)*100*time.Microsecond), s, 1<<20)
		require.GreaterOrEqual(t, p.window(false), int64(16<<20), "after %d completions", i+1)
	}
	require.InEpsilon(t, float64(16<<20)/0.0115, p.rate(), 0.01)
	require.Equal(t, 10*time.Millisecond, p.latency())
}

// TestEarlyCommit: background hydration asks for a commit once it has
// copied enough, long before the commit interval.
func TestEarlyCommit(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	const size = 4 << 20
	src, img := newSource(t, size, 4096)
	dst := blockdevtest.NewMem(t, size, 4096)
	opts := Options{CommitInterval: time.Hour, testEarlyCommit: 256 << 10}
	c, err := Create(src, dst, blockdevtest.NewMem(t, MetadataSize(size, 0), 4096), opts)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Wait(ctx))
	deadline := time.Now().Add(10 * time.Second)
	for c.Status().Commits == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.Positive(t, c.Status().Commits, "no commit with an hour-long interval")
	require.NoError(t, c.Close())
	got := make([]byte, size)
	_, err = dst.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(img, got))
}
