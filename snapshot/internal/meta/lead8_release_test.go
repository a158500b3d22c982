package meta

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ReleaseFrees releases a commit's frees releaseStep at a time, letting
// the lock go between steps: every chunk and page freed is released in
// the end, none twice, and a batch released in part is finished by the
// next step (here 3*releaseStep+5 chunks and the pages of the rewritten
// tree, in one durable transaction).
func TestLead8ReleaseFreesInSteps(t *testing.T) {
	const n = 3*releaseStep + 5
	dev, err := blockdev.NewMem(4096*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(dev, Options{DataChunks: 2 * n, SyncWriteBack: true})
	require.NoError(t, err)
	locs := make([]uint64, n)
	for i := range locs {
		locs[i], err = m.AllocData()
		require.NoError(t, err)
		require.NoError(t, m.Put(Key{B: 0, C: uint64(2 * i), E: 1}, locs[i]))
	}
	fz, err := m.Freeze(1, nil)
	require.NoError(t, err)
	require.NoError(t, fz.Write())
	m.ReleaseFrees()
	for i, loc := range locs {
		_, err := m.Delete(Key{B: 0, C: uint64(2 * i), E: 1})
		require.NoError(t, err)
		require.NoError(t, m.FreeData(loc))
	}
	require.EqualValues(t, n, m.DataHeld())
	fz, err = m.Freeze(2, nil)
	require.NoError(t, err)
	require.NoError(t, fz.Write())

	// One step by hand: a part of the batch, and more left.
	m.mu.Lock()
	more := m.releaseSome(releaseStep)
	m.mu.Unlock()
	require.True(t, more)
	require.Greater(t, m.DataHeld(), uint64(0))

	m.ReleaseFrees()
	require.Zero(t, m.DataHeld())
	m.mu.Lock()
	require.Empty(t, m.deferred, "every batch released and dropped")
	m.mu.Unlock()
	require.NoError(t, m.Check())
	// The chunks are free again, each once.
	for range n {
		_, err := m.AllocData()
		require.NoError(t, err)
	}
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
}
