package exception

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

const confSize = 4 << 20

func TestConformanceOriginNoSnapshot(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		return newOrigin(t, blockdevtest.NewMem(t, confSize, 512))
	})
}

func TestConformanceOriginWithSnapshots(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		o := newOrigin(t, blockdevtest.NewMem(t, confSize, 512))
		_, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2*confSize, 512), Options{ChunkSize: 4096})
		require.NoError(t, err)
		_, err = o.CreateSnapshot(blockdevtest.NewMem(t, 2*confSize, 4096), Options{ChunkSize: 16384, Persistent: true})
		require.NoError(t, err)
		return o
	})
}

func TestConformanceOriginMerging(t *testing.T) {
	// An origin whose snapshot merge is paused: I/O to unmerged chunks is
	// redirected to the snapshot's COW device.
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		o := newOrigin(t, blockdevtest.NewMem(t, confSize, 512))
		s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2*confSize, 512), Options{ChunkSize: 8192, Persistent: true})
		require.NoError(t, err)
		mustWrite(t, o, blockdevtest.Fill(7, confSize/2), 0) // half the chunks get exceptions
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err = s.Merge(ctx, nil)
		require.ErrorIs(t, err, context.Canceled)
		require.Equal(t, StateMerging, s.State())
		return o
	})
}

func TestConformanceSnapshotTransient(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		o := newOrigin(t, blockdevtest.NewMem(t, confSize, 512))
		mustWrite(t, o, blockdevtest.Fill(3, 64<<10), 0)
		s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2*confSize, 512), Options{ChunkSize: 4096})
		require.NoError(t, err)
		return s
	})
}

func TestConformanceSnapshotPersistent(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
			o := newOrigin(t, blockdevtest.NewMem(t, confSize, bs))
			s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2*confSize, bs), Options{Persistent: true})
			require.NoError(t, err)
			return s
		})
	}
}

func TestSnapshotKeepsOriginData(t *testing.T) {
	for _, persistent := range []bool{false, true} {
		o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
		mustWrite(t, o, blockdevtest.Fill('a', 1<<20), 0)
		s1, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2<<20, 512), Options{ChunkSize: 4096, Persistent: persistent})
		require.NoError(t, err)
		mustWrite(t, o, blockdevtest.Fill('b', 6000-6000%512), 512)
		s2, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2<<20, 512), Options{ChunkSize: 8192, Persistent: persistent})
		require.NoError(t, err)
		mustWrite(t, o, blockdevtest.Fill('c', 1<<20), 0)

		require.Equal(t, blockdevtest.Fill('a', 1<<20), blockdevtest.ReadAll(t, s1))
		want2 := blockdevtest.Fill('a', 1<<20)
		copy(want2[512:], blockdevtest.Fill('b', 6000-6000%512))
		require.Equal(t, want2, blockdevtest.ReadAll(t, s2))
		require.Equal(t, blockdevtest.Fill('c', 1<<20), blockdevtest.ReadAll(t, o))
		for _, s := range []*Snapshot{s1, s2} {
			rep, err := s.Check()
			require.NoError(t, err)
			require.Zero(t, rep.Leaked)
			require.Equal(t, uint64((1<<20)/s.ChunkSize()), rep.Exceptions)
		}
		// Delete ends the cost: no more exceptions are made for s1.
		require.NoError(t, s1.Delete())
		_, err = s1.ReadAt(make([]byte, 512), 0)
		require.ErrorIs(t, err, blockdev.ErrClosed)
		require.NoError(t, o.Close())
	}
}

func TestWritableSnapshotWholeChunkNeedsNoRead(t *testing.T) {
	origin := blockdevtest.NewFaulty(blockdevtest.NewMem(t, 1<<20, 512))
	o := newOrigin(t, origin)
	s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2<<20, 512), Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)
	origin.FailWhen(func(c blockdevtest.Call) error {
		if c.Op == blockdevtest.OpRead {
			return errors.New("a whole-chunk snapshot write read the origin")
		}
		return nil
	})
	mustWrite(t, s, blockdevtest.Fill(9, 8192), 4096)
	origin.Clear()
	got := make([]byte, 8192)
	_, err = s.ReadAt(got, 4096)
	require.NoError(t, err)
	require.Equal(t, blockdevtest.Fill(9, 8192), got)
	// A partial write copies the rest of the chunk from the origin.
	mustWrite(t, o, blockdevtest.Fill(1, 1<<20), 0)
	mustWrite(t, s, blockdevtest.Fill(2, 512), 64<<10)
	_, err = s.ReadAt(got[:4096], 64<<10)
	require.NoError(t, err)
	want := make([]byte, 4096)
	copy(want, blockdevtest.Fill(2, 512))
	require.Equal(t, want, got[:4096])
	_, err = s.Check()
	require.NoError(t, err)
}

func TestCOWFullInvalidatesOnlyThatSnapshot(t *testing.T) {
	o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
	small, err := o.CreateSnapshot(blockdevtest.NewMem(t, 64<<10, 512), Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)
	big, err := o.CreateSnapshot(blockdevtest.NewMem(t, 2<<20, 512), Options{ChunkSize: 4096})
	require.NoError(t, err)
	tiny, err := o.CreateSnapshot(blockdevtest.NewMem(t, 16<<10, 512), Options{ChunkSize: 4096})
	require.NoError(t, err)
	mustWrite(t, o, blockdevtest.Fill(5, 1<<20), 0)
	require.Equal(t, blockdevtest.Fill(5, 1<<20), blockdevtest.ReadAll(t, o))
	require.Equal(t, blockdevtest.Fill(0, 1<<20), blockdevtest.ReadAll(t, big))
	for _, s := range []*Snapshot{small, tiny} {
		require.Equal(t, StateInvalid, s.State())
		_, err = s.ReadAt(make([]byte, 512), 0)
		require.ErrorIs(t, err, ErrInvalidSnapshot)
		_, err = s.WriteAt(make([]byte, 512), 0)
		require.ErrorIs(t, err, ErrInvalidSnapshot)
		require.ErrorIs(t, s.Status().Err, ErrNoSpace)
		_, err = s.Check()
		require.NoError(t, err)
	}
	// The kernel records invalidation in the header: valid 0.
	img, err := LoadPersistent(small.cow)
	require.NoError(t, err)
	require.False(t, img.Valid)
	require.NoError(t, small.Delete())
}

func TestOverflowKeepsReads(t *testing.T) {
	o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
	mustWrite(t, o, blockdevtest.Fill(1, 1<<20), 0)
	s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 64<<10, 512), Options{ChunkSize: 4096, Persistent: true, Overflow: true})
	require.NoError(t, err)
	st := s.Status()
	free := int(st.TotalChunks) - int(st.UsedChunks) - 1 // the record's chunk
	var err2 error
	n := 0
	for ; n < 64 && err2 == nil; n++ {
		_, err2 = s.WriteAt(blockdevtest.Fill(2, 4096), int64(n)*4096)
	}
	require.ErrorIs(t, err2, ErrOverflow)
	require.Equal(t, StateOverflow, s.State())
	require.GreaterOrEqual(t, n-1, free-1)
	// Reads still work, and so do writes to chunks the snapshot holds.
	got := make([]byte, 8192)
	_, err = s.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, blockdevtest.Fill(2, 8192), got)
	_, err = s.ReadAt(got, 512<<10)
	require.NoError(t, err)
	require.Equal(t, blockdevtest.Fill(1, 8192), got)
	mustWrite(t, s, blockdevtest.Fill(3, 4096), 0)
	// An origin write that needs a copy the store cannot hold invalidates it.
	mustWrite(t, o, blockdevtest.Fill(4, 4096), 900<<10)
	require.Equal(t, StateInvalid, s.State())
}

func TestStatus(t *testing.T) {
	o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, 512))
	s, err := o.CreateSnapshot(blockdevtest.NewMem(t, 1<<20, 512), Options{ChunkSize: 4096, Persistent: true})
	require.NoError(t, err)
	mustWrite(t, o, blockdevtest.Fill(1, 3*4096), 0)
	st := s.Status()
	require.Equal(t, StateValid, st.State)
	require.True(t, st.Persistent)
	require.Equal(t, int64(4096), st.ChunkSize)
	require.Equal(t, uint64(256), st.TotalChunks)
	require.Equal(t, uint64(3), st.Exceptions)
	require.Equal(t, uint64(5), st.UsedChunks) // header, area 0, 3 data chunks
	require.Equal(t, uint64(2), st.MetadataChunks)
	require.Equal(t, "valid", st.State.String())
}
