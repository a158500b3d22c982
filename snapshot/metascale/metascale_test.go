package metascale

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

func TestPermute(t *testing.T) {
	for _, n := range []uint64{1, 2, 7, 1000, 65537} {
		q := newPermute(n)
		seen := make([]bool, n)
		for range n {
			x := q.next()
			require.Less(t, x, n)
			require.False(t, seen[x], "n %d: %d twice", n, x)
			seen[x] = true
		}
	}
}

// TestPermuteSplit: k walks of a split give the permutation's elements,
// each once, and as many as len said; walk j gives its positions j, j+k...
func TestPermuteSplit(t *testing.T) {
	for _, n := range []uint64{1, 7, 1000, 65537} {
		for _, k := range []int{1, 2, 3, 8} {
			whole := newPermute(n)
			at := make([]uint64, n)
			for i := range at {
				at[i] = whole.next()
			}
			seen := make([]bool, n)
			var got uint64
			for j, part := range newPermute(n).split(k) {
				m := part.len()
				for i := range m {
					x := part.next()
					require.Equal(t, at[uint64(j)+i*uint64(k)], x, "n %d k %d walk %d step %d", n, k, j, i)
					require.False(t, seen[x], "n %d k %d: %d twice", n, k, x)
					seen[x] = true
				}
				got += m
			}
			require.Equal(t, n, got, "n %d k %d", n, k)
		}
	}
}

func TestRunSmall(t *testing.T) {
	for _, random := range []bool{false, true} {
		cfg := Config{Versions: 20000, Random: random, CacheBytes: 256 << 10, CommitEvery: 3000, CrashTail: 2000}
		dev, err := blockdev.NewMem(PageBytes(cfg), 4096)
		require.NoError(t, err)
		res, err := Run(dev, cfg)
		require.NoError(t, err)
		require.Greater(t, res.MetaBytes, uint64(0))
		require.GreaterOrEqual(t, res.Commits, 1)
	}
}

// TestRunStoreSmall runs the whole-store scale run at a small size, both
// orders: every version reaches the index, the power cut loses none of
// what the Flush made durable, and the metadata on disk is counted.
func TestRunStoreSmall(t *testing.T) {
	for _, c := range []struct {
		random  bool
		writers int
	}{{false, 1}, {true, 1}, {true, 3}} {
		cfg := StoreConfig{Versions: 20000, Random: c.random, MetadataCache: 1 << 20, Writers: c.writers}
		head, err := blockdev.Create(filepath.Join(t.TempDir(), "head"), StoreHeadBytes(cfg), blockdev.FileOptions{})
		require.NoError(t, err)
		res, err := RunStore(head, cfg)
		require.NoError(t, err)
		require.NoError(t, head.Close())
		require.Equal(t, int64(cfg.Versions), res.Entries)
		require.Greater(t, res.MetaBytes, int64(0))
		require.Equal(t, int64(1<<20), res.Cache)
		require.Equal(t, c.writers, res.Writers)
	}
}

// TestProgressSumsWriters: the progress line counts every writer's chunks,
// and stopping it waits for its goroutine.
func TestProgressSumsWriters(t *testing.T) {
	done := make([]atomic.Uint64, 3)
	done[0].Store(5)
	done[1].Store(7)
	done[2].Store(11)
	got := make(chan uint64, 1)
	cfg := StoreConfig{ProgressEvery: time.Millisecond, Progress: func(n uint64, _ time.Duration) {
		select {
		case got <- n:
		default:
		}
	}}
	stop := progress(cfg, done, time.Now())
	if n := <-got; n != 23 {
		t.Errorf("progress said %d versions, want 23", n)
	}
	stop()
	stop2 := progress(StoreConfig{}, done, time.Now()) // no Progress: nothing to start
	stop2()
}
