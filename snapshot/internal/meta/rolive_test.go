package meta

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A read-only Meta beside a writer on the same device: once the writer's
// commits reuse pages the read-only Meta's transaction reached, its reads
// and Check return a *ChangedError (ErrChanged, not ErrCorrupt) naming
// both transactions. Without a writer, a damaged page is still ErrCorrupt.
func TestRoliveChangedUnderReadOnly(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 3))
	dev, err := blockdev.NewMem(2048*PageSize, 4096)
	require.NoError(t, err)
	w, err := Format(dev, Options{DataChunks: 1 << 16})
	require.NoError(t, err)
	defer func() { _ = w.Close() }()
	for range 3000 {
		_, err := w.PutData(Key{B: 0, C: rng.Uint64N(1 << 20), E: 1})
		if err != nil {
			require.ErrorIs(t, err, ErrExists)
		}
	}
	require.NoError(t, w.Commit())

	ro, err := Open(dev, Options{ReadOnly: true, CacheBytes: 2 * PageSize})
	require.NoError(t, err)
	defer func() { _ = ro.Close() }()
	require.NoError(t, ro.Check())
	require.NoError(t, ro.Changed())
	from := ro.opened

	// The writer rewrites its tree: every commit shadows the pages it
	// changed, and the next reuses what the one before freed.
	var changed error
	for round := 0; round < 20 && changed == nil; round++ {
		for range 500 {
			_, err := w.PutData(Key{B: 0, C: rng.Uint64N(1 << 20), E: uint32(round + 2)})
			if err != nil {
				require.ErrorIs(t, err, ErrExists)
			}
		}
		require.NoError(t, w.Commit())
		err := ro.Ascend(Key{}, func(Key, uint64) bool { return true })
		if err == nil {
			err = ro.Check()
		}
		if err != nil {
			require.ErrorIs(t, err, ErrChanged)
			require.NotErrorIs(t, err, ErrCorrupt)
			changed = err
		}
	}
	require.Error(t, changed, "20 commits reused no page the read-only Meta reached")
	var ce *ChangedError
	require.ErrorAs(t, changed, &ce)
	require.Equal(t, from, ce.From)
	require.Greater(t, ce.To, from+1)
	require.NoError(t, w.Close())

	// No writer: a damaged tree page is corruption.
	ro2, err := Open(dev, Options{ReadOnly: true, CacheBytes: 2 * PageSize})
	require.NoError(t, err)
	defer func() { _ = ro2.Close() }()
	root := ro2.chunk.root.loc
	p := make([]byte, PageSize)
	_, err = dev.ReadAt(p, int64(root)*PageSize)
	require.NoError(t, err)
	p[PageSize-1] ^= 1
	_, err = dev.WriteAt(p, int64(root)*PageSize)
	require.NoError(t, err)
	err = ro2.Check()
	require.ErrorIs(t, err, ErrCorrupt)
	require.NotErrorIs(t, err, ErrChanged)
}
