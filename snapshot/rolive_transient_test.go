package snapshot

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A transient store keeps its index on the store device's metadata region
// like any other, but writes no journal, and its superblock says that
// nothing can be opened from it: whatever it holds lives until Close. So
// what a session of it needs works for the session: a full metadata
// region refuses with ErrNoSpace, GrowMetadata makes room (a delete too),
// and blank
// volumes (CreateVolume) take writes, snapshots and resizes; Check passes
// throughout. After Close, Open refuses the device with ErrBadOptions.
func TestRoliveTransientSession(t *testing.T) {
	skipUnderRace(t) // filling the region takes minutes under -race
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 11))
	origin, err := blockdev.NewMem(64<<30, 4096) // sparse
	require.NoError(t, err)
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	opts := growMetaOpts
	opts.Transient = true
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	defer func() { _ = s.Close() }()

	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	fillMetadata(t, c, rng)
	mustCheck(t, s)
	added, err := s.GrowMetadata(context.Background(), 1<<20)
	require.NoError(t, err)
	require.Equal(t, int64(1<<20), added)
	for range 500 { // room again
		x := rng.Int64N(c.Size()/growChunk/8) * 8
		require.NoError(t, c.Discard(x*growChunk, 8*growChunk))
	}
	mustCheck(t, s)

	op, err := s.Delete("c")
	require.NoError(t, err)
	require.NoError(t, op.Wait(context.Background()))
	require.NoError(t, s.WaitIdle(context.Background()))

	v, err := s.CreateVolume("blank", 1<<20)
	require.NoError(t, err)
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	_, err = v.WriteAt(data, 128<<10)
	require.NoError(t, err)
	vs, err := s.CreateSnapshot("blank-s", v)
	require.NoError(t, err)
	require.NoError(t, s.Resize("blank", 4<<20, ResizeOptions{}))
	require.NoError(t, s.Resize("blank", 64<<10, ResizeOptions{Shrink: true}))
	got := make([]byte, 64<<10)
	_, err = vs.ReadAt(got, 128<<10)
	require.NoError(t, err)
	require.Equal(t, data, got, "the snapshot of the blank volume")
	require.Equal(t, int64(64<<10), v.Size())
	mustCheck(t, s)
	require.NoError(t, s.Close())

	_, err = Open(origin, store, growMetaOpts)
	require.ErrorIs(t, err, ErrBadOptions, "a transient store kept nothing to open")
}
