package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// newPool formats a store without an origin on a fresh Mem device.
func newPool(t testing.TB, storeSize int64, opts Options) (*Store, *blockdev.Mem) {
	t.Helper()
	store, err := blockdev.NewMem(storeSize, 4096)
	require.NoError(t, err)
	s, err := Format(nil, store, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, store
}

func readAll(t testing.TB, d blockdev.Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	_, err := d.ReadAt(b, 0)
	require.NoError(t, err)
	return b
}

func TestPoolConformance(t *testing.T) {
	t.Run("blank", func(t *testing.T) {
		blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
			s, _ := newPool(t, 48<<20, Options{ChunkSize: 16 << 10})
			v, err := s.CreateVolume("v", 8<<20)
			require.NoError(t, err)
			_, err = s.CreateSnapshot("v-s1", v)
			require.NoError(t, err)
			return v
		})
	})
	t.Run("clone-of-blank", func(t *testing.T) {
		blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
			s, _ := newPool(t, 48<<20, Options{ChunkSize: 16 << 10})
			v, err := s.CreateVolume("v", 8<<20)
			require.NoError(t, err)
			_, err = v.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 1<<20)
			require.NoError(t, err)
			c, err := s.CreateClone("c", v)
			require.NoError(t, err)
			return c
		})
	})
}

// A store without an origin holds blank volumes with their own sizes,
// their snapshots and clones, and all of it survives a reopen.
func TestPoolNoOrigin(t *testing.T) {
	s, store := newPool(t, 32<<20, Options{ChunkSize: 16 << 10, MaxVolumeSize: 1 << 30})
	require.False(t, s.HasOrigin())
	require.Equal(t, int64(1<<30), s.MaxVolumeSize())
	require.Empty(t, s.List())
	_, err := s.OpenVolume("origin")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = s.CreateSnapshot("o", s.Origin())
	require.ErrorIs(t, err, ErrNotFound, "no origin to snapshot")
	_, err = s.CreateClone("o", s.Origin())
	require.ErrorIs(t, err, ErrNotFound)
	_, err = s.Origin().ReadAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, ErrNotFound)

	a, err := s.CreateVolume("a", 1<<20)
	require.NoError(t, err)
	b, err := s.CreateVolume("b", 3<<20+4096) // not a multiple of the chunk size
	require.NoError(t, err)
	require.Equal(t, int64(1<<20), a.Size())
	require.Equal(t, int64(3<<20+4096), b.Size())
	require.Equal(t, KindVolume, a.Kind())
	require.Equal(t, make([]byte, 1<<20), readAll(t, a), "a blank volume reads zeros")
	require.Equal(t, 0, int(s.Stats().usedChunks()), "and holds no store space")

	_, err = a.WriteAt(bytes.Repeat([]byte{1}, 8192), 8192)
	require.NoError(t, err)
	tail := bytes.Repeat([]byte{2}, 4096)
	_, err = b.WriteAt(tail, 3<<20) // the partial last chunk
	require.NoError(t, err)
	_, err = b.WriteAt(tail, 3<<20+4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)

	snap, err := s.CreateSnapshot("a@1", a)
	require.NoError(t, err)
	require.Equal(t, a.Size(), snap.Size())
	cl, err := s.CreateClone("a-clone", snap)
	require.NoError(t, err)
	require.Equal(t, a.Size(), cl.Size())
	require.Equal(t, KindClone, cl.Kind())
	_, err = a.WriteAt(bytes.Repeat([]byte{3}, 4096), 0)
	require.NoError(t, err)
	wantSnap := readAll(t, snap)
	require.Equal(t, wantSnap, readAll(t, cl))
	require.Equal(t, byte(0), wantSnap[0])
	require.Equal(t, byte(1), wantSnap[8192])

	uuids := map[string]UUID{}
	for _, i := range s.List() {
		require.NotEqual(t, UUID{}, i.UUID)
		for n, u := range uuids {
			require.NotEqual(t, u, i.UUID, "%s and %s", n, i.Name)
		}
		uuids[i.Name] = i.UUID
	}
	require.Len(t, uuids, 4)
	require.Equal(t, uuids["a"], a.UUID())
	mustCheck(t, s)
	wantA, wantB := readAll(t, a), readAll(t, b)
	require.NoError(t, s.Close())

	store2, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	_, err = Open(store2, store, Options{})
	require.ErrorIs(t, err, ErrBadOptions, "a store without an origin is opened without one")

	s2, err := Open(nil, store, Options{})
	require.NoError(t, err)
	defer s2.Close()
	for _, i := range s2.List() {
		require.Equal(t, uuids[i.Name], i.UUID, "%s: the UUID is stable", i.Name)
	}
	a2, err := s2.OpenVolume("a")
	require.NoError(t, err)
	b2, err := s2.OpenVolume("b")
	require.NoError(t, err)
	require.Equal(t, wantA, readAll(t, a2))
	require.Equal(t, wantB, readAll(t, b2))
	require.Equal(t, KindVolume, b2.Info().Kind)
	mustCheck(t, s2)

	// The same after a reopen that replays the journal (no tree commit).
	_, err = b2.WriteAt(tail, 0)
	require.NoError(t, err)
	require.NoError(t, b2.Flush())
	_, err = s2.CreateVolume("c", 64<<10)
	require.NoError(t, err)
	img := crashImage(t, store)
	s3, err := Open(nil, img, Options{TakeOver: true}) // s2, in this process, still holds the image's owner record
	require.NoError(t, err)
	defer s3.Close()
	c3, err := s3.OpenVolume("c")
	require.NoError(t, err)
	require.Equal(t, int64(64<<10), c3.Size())
	b3, err := s3.OpenVolume("b")
	require.NoError(t, err)
	require.Equal(t, tail, readAll(t, b3)[:4096])
	mustCheck(t, s3)
}

// crashImage copies a device as it stands, as a power cut would leave it
// with every completed write kept (Mem keeps what it was given).
func crashImage(t testing.TB, d *blockdev.Mem) *blockdev.Mem {
	t.Helper()
	img, err := blockdev.NewMem(d.Size(), d.BlockSize())
	require.NoError(t, err)
	buf := readAll(t, d)
	_, err = img.WriteAt(buf, 0)
	require.NoError(t, err)
	return img
}

// A blank volume in a store with an origin reads zeros, never the origin;
// a store with an origin must be opened with it.
func TestPoolBlankBesideOrigin(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: 16 << 10})
	require.True(t, s.HasOrigin())
	require.Equal(t, int64(defaultMaxVolumeSize), s.MaxVolumeSize())
	v, err := s.CreateVolume("blank", 4<<20)
	require.NoError(t, err)
	require.Equal(t, make([]byte, 4<<20), readAll(t, v))
	require.Len(t, s.List(), 2)
	require.NoError(t, s.Close())
	_, err = Open(nil, store, Options{})
	require.ErrorIs(t, err, ErrBadOptions)
	s2, err := Open(origin, store, Options{})
	require.NoError(t, err)
	defer s2.Close()
	v2, err := s2.OpenVolume("blank")
	require.NoError(t, err)
	require.Equal(t, int64(4<<20), v2.Size())
}

func TestCreateVolumeRefusals(t *testing.T) {
	s, _ := newPool(t, 16<<20, Options{ChunkSize: 16 << 10, MaxVolumeSize: 1 << 20})
	for _, size := range []int64{0, -4096, 1000, 1<<20 + 4096} {
		_, err := s.CreateVolume("v", size)
		require.ErrorIs(t, err, ErrBadOptions, "size %d", size)
	}
	_, err := s.CreateVolume("a/b", 4096)
	require.ErrorIs(t, err, ErrBadName)
	_, err = s.CreateVolume("v", 1<<20)
	require.NoError(t, err)
	_, err = s.CreateVolume("v", 4096)
	require.ErrorIs(t, err, ErrExists)

	store, err := blockdev.NewMem(16<<20, 4096)
	require.NoError(t, err)
	origin, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	_, err = Format(origin, store, Options{MaxVolumeSize: 1 << 20})
	require.ErrorIs(t, err, ErrBadOptions, "the bound is at least the origin")
	_, err = Format(nil, store, Options{MaxVolumeSize: -1})
	require.ErrorIs(t, err, ErrBadOptions)
}

// A store formatted before the volume size bound was recorded (superblock
// bytes 120-159 zero) bounds its volumes by the origin's size.
func TestSuperblockWithoutVolumeBound(t *testing.T) {
	g := geometry{chunkSize: 64 << 10, originSize: 1 << 20, storeSize: 64 << 20, journalOff: superblockSize, journalLen: 1 << 20,
		metaOff: superblockSize + 1<<20, metaLen: 1 << 20, dataOff: 4 << 20, dataChunks: 10, version: superblockVersion}
	got, err := decodeSuperblock(g.encode())
	require.NoError(t, err)
	require.Equal(t, int64(1<<20), got.volumeBound())
	g.maxVolSize = 1 << 30
	got, err = decodeSuperblock(g.encode())
	require.NoError(t, err)
	require.Equal(t, int64(1<<30), got.volumeBound())
	for _, bad := range []func(g *geometry){
		func(g *geometry) { g.maxVolSize = 1 << 19 },                              // below the origin
		func(g *geometry) { g.maxVolSize = 1<<30 + 4096 },                         // not whole chunks
		func(g *geometry) { g.noOrigin = true },                                   // no origin, yet a size
		func(g *geometry) { g.originSize, g.noOrigin = 0, false },                 // an origin of no bytes
		func(g *geometry) { g.originSize, g.maxVolSize, g.noOrigin = 0, 0, true }, // no bound
	} {
		b := g
		bad(&b)
		_, err := decodeSuperblock(b.encode())
		require.ErrorIs(t, err, ErrCorrupt)
	}
}

func fill(t testing.TB, d blockdev.Device, b byte, off, n int64) {
	t.Helper()
	_, err := d.WriteAt(bytes.Repeat([]byte{b}, int(n)), off)
	require.NoError(t, err)
}

// Resize grows, shrinks only when asked, frees the tail, and a grow reads
// zeros where the volume had data before a shrink, with or without the
// tail's entries (a crash between a shrink's records leaves them).
func TestResizeBlank(t *testing.T) {
	const cs = 16 << 10
	s, store := newPool(t, 32<<20, Options{ChunkSize: cs, MaxVolumeSize: 64 << 20})
	v, err := s.CreateVolume("v", 1<<20)
	require.NoError(t, err)
	fill(t, v, 9, 0, 1<<20)
	snap, err := s.CreateSnapshot("v@1", v)
	require.NoError(t, err)
	fill(t, v, 8, 0, 1<<20) // the snapshot keeps the 9s

	require.NoError(t, s.Resize("v", 2<<20, ResizeOptions{}))
	require.Equal(t, int64(2<<20), v.Size(), "an open handle sees the new size")
	got := readAll(t, v)
	require.Equal(t, bytes.Repeat([]byte{8}, 1<<20), got[:1<<20])
	require.Equal(t, make([]byte, 1<<20), got[1<<20:])

	err = s.Resize("v", 512<<10, ResizeOptions{})
	require.ErrorIs(t, err, ErrBadOptions, "a shrink must be asked for")
	require.NoError(t, s.Checkpoint(t.Context()))
	used := s.Stats().UsedBytes
	require.NoError(t, s.Resize("v", 512<<10+4096, ResizeOptions{Shrink: true}))
	require.Equal(t, int64(512<<10+4096), v.Size())
	_, err = v.ReadAt(make([]byte, 4096), 512<<10+4096)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	require.NoError(t, s.Checkpoint(t.Context()))
	require.NoError(t, s.Checkpoint(t.Context()))
	require.Less(t, s.Stats().UsedBytes, used, "the tail's chunks are freed")
	require.Equal(t, int64(1<<20), snap.Size())
	require.Equal(t, bytes.Repeat([]byte{9}, 1<<20), readAll(t, snap), "the snapshot keeps its data and size")

	require.NoError(t, s.Resize("v", 1<<20, ResizeOptions{}))
	got = readAll(t, v)
	require.Equal(t, bytes.Repeat([]byte{8}, 512<<10+4096), got[:512<<10+4096])
	require.Equal(t, make([]byte, 1<<20-(512<<10+4096)), got[512<<10+4096:], "the grown tail reads zeros, the old last chunk's rest too")

	// Leftover live entries past the size (a shrink cut short) are zeroed
	// by the next grow.
	fill(t, v, 7, 0, 1<<20)
	require.NoError(t, s.logSize(v.meta, 256<<10))
	require.NoError(t, s.Resize("v", 1<<20, ResizeOptions{}))
	got = readAll(t, v)
	require.Equal(t, bytes.Repeat([]byte{7}, 256<<10), got[:256<<10])
	require.Equal(t, make([]byte, 768<<10), got[256<<10:])
	mustCheck(t, s)

	err = s.Resize("v@1", 4<<20, ResizeOptions{})
	require.ErrorIs(t, err, ErrReadOnly)
	err = s.Resize("v", 128<<20, ResizeOptions{})
	require.ErrorIs(t, err, ErrBadOptions, "past MaxVolumeSize")
	err = s.Resize("nope", 1<<20, ResizeOptions{})
	require.ErrorIs(t, err, ErrNotFound)

	want := readAll(t, v)
	require.NoError(t, s.Close())
	s2, err := Open(nil, store, Options{})
	require.NoError(t, err)
	defer s2.Close()
	v2, err := s2.OpenVolume("v")
	require.NoError(t, err)
	require.Equal(t, want, readAll(t, v2))
	mustCheck(t, s2)
}

// A clone grown past its parent reads zeros there, even where the parent
// still has data (its snapshot was taken before the parent shrank); a
// clone of the origin grows past the origin's end, whose last chunk is a
// part one.
func TestResizeClones(t *testing.T) {
	const cs = 16 << 10
	s, _, _ := newMemStore(t, 1<<20+4096, 32<<20, Options{ChunkSize: cs})
	c, err := s.CreateClone("c", s.Origin())
	require.NoError(t, err)
	orig := readAll(t, s.Origin())
	require.NoError(t, s.Resize("c", 2<<20, ResizeOptions{}))
	got := readAll(t, c)
	require.Equal(t, orig, got[:len(orig)])
	require.Equal(t, make([]byte, 2<<20-len(orig)), got[len(orig):])
	fill(t, c, 5, 1<<20+4096, 8192) // within the origin's last chunk, past its end
	fill(t, c, 6, 1<<20, 4096)      // then the origin's part of it
	got = readAll(t, c)
	require.Equal(t, bytes.Repeat([]byte{6}, 4096), got[1<<20:1<<20+4096])
	require.Equal(t, bytes.Repeat([]byte{5}, 8192), got[1<<20+4096:1<<20+12288])

	// A volume snapshotted, then shrunk; a clone of the snapshot shrunk
	// and grown again reads zeros in the regrown range.
	v, err := s.CreateVolume("v", 1<<20)
	require.NoError(t, err)
	fill(t, v, 3, 0, 1<<20)
	snap, err := s.CreateSnapshot("v@1", v)
	require.NoError(t, err)
	cl, err := s.CreateClone("vc", snap)
	require.NoError(t, err)
	require.NoError(t, s.Resize("vc", 256<<10, ResizeOptions{Shrink: true}))
	require.NoError(t, s.Resize("vc", 1<<20, ResizeOptions{}))
	got = readAll(t, cl)
	require.Equal(t, bytes.Repeat([]byte{3}, 256<<10), got[:256<<10])
	require.Equal(t, make([]byte, 768<<10), got[256<<10:])
	require.Equal(t, bytes.Repeat([]byte{3}, 1<<20), readAll(t, snap))

	// Rollback gives the snapshot's size back.
	require.NoError(t, s.Resize("v", 3<<20, ResizeOptions{}))
	fill(t, v, 4, 2<<20, 4096)
	require.NoError(t, s.Rollback(t.Context(), v, snap))
	require.Equal(t, int64(1<<20), v.Size())
	require.Equal(t, bytes.Repeat([]byte{3}, 1<<20), readAll(t, v))
	// A reset of the clone to its parent snapshot too.
	require.NoError(t, s.Rollback(t.Context(), cl, snap))
	require.Equal(t, bytes.Repeat([]byte{3}, 1<<20), readAll(t, cl))
	require.NoError(t, s.Resize("v", 2<<20, ResizeOptions{}))
	require.Equal(t, make([]byte, 1<<20), readAll(t, v)[1<<20:], "the rolled-back tail is gone")

	err = s.Resize("origin", 4<<20, ResizeOptions{})
	require.ErrorIs(t, err, ErrBadOptions)
	mustCheck(t, s)
}

// A store whose superblock predates the pool fields (bytes 120-131 zero)
// opens as before: its volumes have the origin's size, and new volumes are
// bounded by it.
func TestOpenStoreWithoutPoolFields(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: 16 << 10})
	snap, err := s.CreateSnapshot("s1", s.Origin())
	require.NoError(t, err)
	_, err = s.CreateClone("c1", snap)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	sb := make([]byte, superblockSize)
	_, err = store.ReadAt(sb, 0)
	require.NoError(t, err)
	g, err := decodeSuperblock(sb)
	require.NoError(t, err)
	g.maxVolSize = 0
	_, err = store.WriteAt(g.encode(), 0)
	require.NoError(t, err)

	s2, err := Open(origin, store, Options{})
	require.NoError(t, err)
	defer s2.Close()
	require.Equal(t, int64(1<<20), s2.MaxVolumeSize())
	for _, i := range s2.List() {
		require.Equal(t, int64(1<<20), i.Size, i.Name)
	}
	_, err = s2.CreateVolume("big", 2<<20)
	require.ErrorIs(t, err, ErrBadOptions)
	v, err := s2.CreateVolume("small", 512<<10)
	require.NoError(t, err)
	require.Equal(t, make([]byte, 512<<10), readAll(t, v))
	mustCheck(t, s2)
}

// Resizes race writers and readers of the volume: every I/O either
// succeeds or is out of range, and the store checks clean.
func TestResizeUnderIO(t *testing.T) {
	const cs = 16 << 10
	s, _ := newPool(t, 64<<20, Options{ChunkSize: cs})
	v, err := s.CreateVolume("v", 4<<20)
	require.NoError(t, err)
	seed := blockdevtest.Seed(t)
	done := make(chan struct{})
	errs := make(chan error, 4)
	for g := range 3 {
		go func() {
			rng := newRand(seed + uint64(g))
			p := bytes.Repeat([]byte{byte(g + 1)}, 8192)
			for {
				select {
				case <-done:
					errs <- nil
					return
				default:
				}
				off := rng.Int64N(8<<20/8192) * 8192
				var err error
				if g == 2 {
					_, err = v.ReadAt(p, off)
				} else {
					_, err = v.WriteAt(p, off)
				}
				if err != nil && !errors.Is(err, blockdev.ErrOutOfRange) {
					errs <- err
					return
				}
			}
		}()
	}
	for i := range 40 {
		size := int64(1+i%8) << 20
		require.NoError(t, s.Resize("v", size, ResizeOptions{Shrink: true}))
		if i%10 == 0 {
			_, err := s.CreateSnapshot(fmt.Sprintf("v@%d", i), v)
			require.NoError(t, err)
		}
	}
	close(done)
	for range 3 {
		require.NoError(t, <-errs)
	}
	mustCheck(t, s)
}
