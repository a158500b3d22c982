package snapshot

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

// A read of a clone chain resolves with no page read under Store.mu, so it
// holds Store.mu untimed (lockstat's RLockShort): reads through clone
// levels, to the origin and to store chunks, return the right data, leave
// no shared span in LockStats, and allocate nothing.
func TestCloneReadUntimedHolds(t *testing.T) {
	const cs = 4 << 10
	// No committer: nothing but this test's reads takes Store.mu meanwhile.
	s, origin, _ := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: -1})
	o := s.Origin()
	want := make([]byte, origin.Size())
	_, err := o.ReadAt(want, 0)
	require.NoError(t, err)

	// A chain of three clones; the middle one gets data of its own in every
	// fourth chunk before the top one is made, and the origin is
	// overwritten after the chain was made, so reads resolve to the middle
	// level, to the origin's copies in the store, and to the origin device.
	c0, err := s.CreateClone("c0", o)
	require.NoError(t, err)
	c1, err := s.CreateClone("c1", c0)
	require.NoError(t, err)
	own := bytes.Repeat([]byte{0xc1}, cs)
	for off := int64(0); off < origin.Size(); off += 4 * cs {
		_, err := c1.WriteAt(own, off)
		require.NoError(t, err)
		copy(want[off:], own)
	}
	top, err := s.CreateClone("c2", c1)
	require.NoError(t, err)
	over := bytes.Repeat([]byte{0x0f}, cs)
	for off := int64(cs); off < origin.Size(); off += 3 * cs {
		_, err := o.WriteAt(over, off)
		require.NoError(t, err)
	}
	require.NoError(t, o.Flush())

	s.ResetLockStats()
	got := make([]byte, cs)
	for off := int64(0); off < origin.Size(); off += cs {
		_, err := top.ReadAt(got, off)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want[off:off+cs], got), "chunk %d", off/cs)
	}
	st := s.LockStats().Store
	require.Zero(t, st.MaxShared, "a read's resolution was timed (held by %s)", st.SharedBy)

	if raceEnabled {
		return // the race detector allocates
	}
	var off int64
	allocs := testing.AllocsPerRun(200, func() {
		off = (off + 5*cs) % origin.Size()
		if _, err := top.ReadAt(got, off); err != nil {
			panic(err)
		}
	})
	require.Zero(t, allocs, "a clone read allocated")
}
