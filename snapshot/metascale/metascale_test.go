package metascale

import (
	"testing"

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
