package snapshot

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestLead9OriginBufferShrinksWhenIdle: the origin buffer drops its free
// entries (its memory) at the obIdleTicks-th committer tick in a row with
// nothing buffered and no copy-on-write; a copy-on-write between two
// ticks starts the count again; after the drop, copy-on-write writes
// buffer again and read back, and the snapshot still reads its own data.
func TestLead9OriginBufferShrinksWhenIdle(t *testing.T) {
	const cs = 4 << 10
	s, _ := newMemStore512(t, 1<<20, 8<<20, Options{ChunkSize: cs, CommitInterval: -1})
	o := s.Origin()
	before := blockdevtest.ReadAll(t, o)
	_, err := s.CreateSnapshot("a", o)
	require.NoError(t, err)
	p := bytes.Repeat([]byte{0x5a}, 8*cs)
	_, err = o.WriteAt(p, 0) // eight copies: eight entries taken
	require.NoError(t, err)
	require.Positive(t, s.Stats().bufferedChunks())
	require.False(t, s.obIdleTick(), "entries are buffered")
	require.NoError(t, o.Flush()) // drained: the entries are free again
	require.NotEmpty(t, s.ob.free)

	// ticks makes ticks until the buffer drops its entries (at most
	// twice obIdleTicks) and returns how many it took.
	ticks := func() int {
		for i := 1; i <= 2*obIdleTicks; i++ {
			if s.obIdleTick() {
				return i
			}
		}
		return -1
	}
	for range obIdleTicks - 1 {
		s.obIdleTick()
	}
	_, err = o.WriteAt(p[:cs], 8*cs) // one more copy-on-write: the origin is not idle
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	// The first tick after the write sees it and starts the count.
	require.Equal(t, obIdleTicks+1, ticks())
	require.Empty(t, s.ob.free)
	require.False(t, s.obIdleTick(), "nothing left to drop")

	_, err = o.WriteAt(p[:2*cs], 16*cs) // buffers again, from a new slab
	require.NoError(t, err)
	require.Positive(t, s.Stats().bufferedChunks())
	got := make([]byte, 2*cs)
	_, err = o.ReadAt(got, 16*cs)
	require.NoError(t, err)
	require.Equal(t, p[:2*cs], got)
	require.NoError(t, o.Flush())
	a, err := s.OpenVolume("a")
	require.NoError(t, err)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, a), before), "the snapshot")
	mustCheck(t, s)
}

// TestLead9OriginBufferShrinkBesideWriters: with the committer ticking
// every millisecond, so that the buffer drops its entries whenever the
// writers pause, origin writes that copy, flushes and snapshots run
// beside it; every snapshot and the origin then read what was written
// (run with -race: the drop races the writers' takes).
func TestLead9OriginBufferShrinkBesideWriters(t *testing.T) {
	const cs, chunks = 4 << 10, 256
	s, _ := newMemStore512(t, chunks*cs, 16<<20, Options{ChunkSize: cs, CommitInterval: time.Millisecond})
	o := s.Origin()
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 23))
	model := blockdevtest.ReadAll(t, o)
	snaps := map[string][]byte{}
	buf := make([]byte, cs)
	for i := range 300 {
		switch {
		case i%50 == 0:
			name := fmt.Sprintf("s%d", i)
			_, err := s.CreateSnapshot(name, o)
			require.NoError(t, err)
			snaps[name] = bytes.Clone(model)
		case i%7 == 0:
			require.NoError(t, o.Flush())
			time.Sleep(time.Duration(rng.IntN(10)) * time.Millisecond) // a pause: the buffer may shrink
		default:
			c := rng.IntN(chunks)
			buf[0], buf[cs-1] = byte(i), byte(i>>8)
			_, err := o.WriteAt(buf, int64(c)*cs)
			require.NoError(t, err)
			copy(model[c*cs:], buf)
		}
	}
	s.ob.mu.Lock()
	t.Logf("the buffer dropped its entries %d times", s.ob.idle.drops) // the pauses' luck: not asserted
	s.ob.mu.Unlock()
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o), model), "the origin")
	for name, want := range snaps {
		v, err := s.OpenVolume(name)
		require.NoError(t, err)
		require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, v), want), "snapshot %s", name)
	}
	mustCheck(t, s)
}
