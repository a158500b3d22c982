package snapshot

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// A drain marks every sample its buffered chunks touch in one write of
// the identity slots (markQueued), not one per sample, and what it writes
// out stays what was written.
func TestDrainMarksSamplesOnce(t *testing.T) {
	const size = 1 << 20
	s, _, _ := newMemStore(t, size, 8<<20, Options{ChunkSize: 4 << 10, CommitInterval: -1})
	o := s.Origin()
	_, err := s.CreateSnapshot("s", o)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	require.Zero(t, s.id.durable.Load(), "nothing written since the Flush")
	pos, n := samplePositions(size)
	require.Greater(t, n, 2)
	for i := range n {
		fillAt(t, o, byte(i+1), pos[i], 4096) // a copy-on-write each: buffered
	}
	require.EqualValues(t, n, s.ob.n.Load())
	require.Zero(t, s.id.durable.Load(), "nothing reached the origin device yet")
	seq := s.id.st.seq
	require.NoError(t, s.drainOrigin(context.Background(), false))
	require.Equal(t, seq+1, s.id.st.seq, "one identity write for the drain")
	require.EqualValues(t, uint32(1)<<n-1, s.id.durable.Load())
	require.Zero(t, s.ob.n.Load())
	buf := make([]byte, 4096)
	for i := range n {
		_, err := s.origin.ReadAt(buf, pos[i])
		require.NoError(t, err)
		require.Equal(t, byte(i+1), buf[0], "sample %d on the origin device", i)
	}
	// Written again with every bit durable: no identity write at all.
	for i := range n {
		fillAt(t, o, byte(i+100), pos[i], 4096)
	}
	require.NoError(t, s.drainOrigin(context.Background(), false))
	require.Equal(t, seq+1, s.id.st.seq)
	require.NoError(t, o.Flush())
	require.Zero(t, s.id.durable.Load(), "settled by the Flush")
	mustCheck(t, s)
}
