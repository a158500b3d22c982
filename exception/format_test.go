package exception

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// kpair is an exception as the test's own decoder sees it.
type kpair struct{ old, new uint64 }

// kernelDecode is an independent decoder of the dm-snapshot persistent
// format, written from the format description (not from format.go): it
// returns the header fields and the exceptions area by area.
func kernelDecode(img []byte) (magic, valid, version, chunkSectors uint32, pairs []kpair, err error) {
	le := binary.LittleEndian
	magic, valid, version, chunkSectors = le.Uint32(img[0:]), le.Uint32(img[4:]), le.Uint32(img[8:]), le.Uint32(img[12:])
	if magic != 0x70416e53 || version != 1 {
		return magic, valid, version, chunkSectors, nil, errors.New("not a version 1 SnAp header")
	}
	chunk := int(chunkSectors) * 512
	epa := chunk / 16
	for area := 0; ; area++ {
		start := (1 + area*(epa+1)) * chunk
		if start+chunk > len(img) {
			return magic, valid, version, chunkSectors, pairs, nil
		}
		for j := 0; j < epa; j++ {
			o, n := le.Uint64(img[start+16*j:]), le.Uint64(img[start+16*j+8:])
			if n == 0 {
				return magic, valid, version, chunkSectors, pairs, nil
			}
			pairs = append(pairs, kpair{o, n})
		}
	}
}

// putKernelHeader and putKernelPair build images byte by byte.
func putKernelHeader(img []byte, valid, version, chunkSectors uint32) {
	binary.LittleEndian.PutUint32(img[0:], 0x70416e53)
	binary.LittleEndian.PutUint32(img[4:], valid)
	binary.LittleEndian.PutUint32(img[8:], version)
	binary.LittleEndian.PutUint32(img[12:], chunkSectors)
}

func putKernelPair(img []byte, chunk, area, index int, p kpair) {
	epa := chunk / 16
	at := (1+area*(epa+1))*chunk + 16*index
	binary.LittleEndian.PutUint64(img[at:], p.old)
	binary.LittleEndian.PutUint64(img[at+8:], p.new)
}

func memFrom(t testing.TB, img []byte, bs int) *blockdev.Mem {
	m := blockdevtest.NewMem(t, int64(len(img)), bs)
	mustWrite(t, m, img, 0)
	return m
}

// chunkPattern is what the test stores for origin chunk old.
func chunkPattern(old uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(old*7+uint64(i/512)) | 0x80
	}
	return b
}

func TestKernelImageOutOfOrderWithHole(t *testing.T) {
	const chunk, originSize, cowSize = 4096, 1 << 20, 1 << 20
	img := make([]byte, cowSize)
	putKernelHeader(img, 1, 1, chunk/512)
	// As the kernel leaves it after out-of-order commits and a crash: chunk
	// 4 was allocated but its exception never committed.
	pairs := []kpair{{5, 3}, {2, 2}, {7, 5}, {100, 6}}
	for i, p := range pairs {
		putKernelPair(img, chunk, 0, i, p)
		copy(img[int(p.new)*chunk:], chunkPattern(p.old, chunk))
	}
	cow := memFrom(t, img, 512)
	origin := blockdevtest.NewMem(t, originSize, 512)
	mustWrite(t, origin, blockdevtest.Fill(0x11, originSize), 0)
	o := newOrigin(t, origin)
	s, err := o.OpenSnapshot(cow, Options{})
	require.NoError(t, err)
	require.Equal(t, int64(chunk), s.ChunkSize())

	got := blockdevtest.ReadAll(t, s)
	for c := uint64(0); c < originSize/chunk; c++ {
		want := blockdevtest.Fill(0x11, chunk)
		for _, p := range pairs {
			if p.old == c {
				want = chunkPattern(c, chunk)
			}
		}
		require.Equal(t, want, got[c*chunk:(c+1)*chunk], "chunk %d", c)
	}
	rep, err := s.Check()
	require.NoError(t, err)
	require.Equal(t, uint64(1), rep.Leaked, "the kernel's hole at chunk 4")
	st := s.Status()
	require.Equal(t, uint64(7), st.UsedChunks, "next_free is one past the highest new_chunk")

	// New exceptions go after the kernel's, from next_free on.
	mustWrite(t, o, blockdevtest.Fill(0x22, chunk), 9*chunk)
	require.NoError(t, s.Close())
	_, _, _, _, dec, err := kernelDecode(blockdevtest.ReadAll(t, cow))
	require.NoError(t, err)
	require.Equal(t, append(pairs, kpair{9, 7}), dec)
	require.Equal(t, blockdevtest.Fill(0x11, chunk), blockdevtest.ReadAll(t, cow)[7*chunk:8*chunk])
}

func TestKernelImageTwoAreas(t *testing.T) {
	// 512-byte chunks: 32 exceptions per area; 40 exceptions fill area 0
	// (chunk 1, data 2..33) and start area 1 (chunk 34, data 35...).
	const chunk, n = 512, 40
	img := make([]byte, 128<<10)
	putKernelHeader(img, 1, 1, 1)
	next := uint64(2)
	for i := range n {
		if next%33 == 1 {
			next++
		}
		p := kpair{uint64(i * 3), next}
		putKernelPair(img, chunk, i/32, i%32, p)
		copy(img[int(p.new)*chunk:], chunkPattern(p.old, chunk))
		next++
	}
	o := newOrigin(t, blockdevtest.NewMem(t, 128<<10, 512))
	s, err := o.OpenSnapshot(memFrom(t, img, 512), Options{})
	require.NoError(t, err)
	got := blockdevtest.ReadAll(t, s)
	for i := range n {
		c := i * 3
		require.Equal(t, chunkPattern(uint64(c), chunk), got[c*chunk:(c+1)*chunk], "chunk %d", c)
	}
	require.Equal(t, make([]byte, chunk), got[chunk:2*chunk])
	rep, err := s.Check()
	require.NoError(t, err)
	require.Zero(t, rep.Leaked)
	require.Equal(t, uint64(n), rep.Exceptions)
}

func TestImageWeWriteDecodes(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 2))
	const chunk, originSize = 512, 128 << 10
	origin := blockdevtest.NewMem(t, originSize, 512)
	for c := 0; c < originSize/chunk; c++ {
		mustWrite(t, origin, chunkPattern(uint64(c), chunk), int64(c*chunk))
	}
	cow := blockdevtest.NewMem(t, 256<<10, 512)
	o := newOrigin(t, origin)
	s, err := o.CreateSnapshot(cow, Options{ChunkSize: chunk, Persistent: true})
	require.NoError(t, err)
	order := rng.Perm(originSize / chunk)[:100]
	for _, c := range order {
		mustWrite(t, o, blockdevtest.Fill(0xee, chunk), int64(c*chunk))
	}
	require.NoError(t, s.Close())

	img := blockdevtest.ReadAll(t, cow)
	magic, valid, version, sectors, pairs, err := kernelDecode(img)
	require.NoError(t, err)
	require.Equal(t, []uint32{0x70416e53, 1, 1, 1}, []uint32{magic, valid, version, sectors})
	require.Len(t, pairs, len(order))
	epa := chunk / 16
	for i, p := range pairs {
		require.Equal(t, uint64(order[i]), p.old, "exception %d in write order", i)
		// Dense: exception i sits in the i-th data chunk.
		area, j := i/epa, i%epa
		require.Equal(t, uint64(1+area*(epa+1)+1+j), p.new)
		require.Equal(t, chunkPattern(p.old, chunk), img[int(p.new)*chunk:int(p.new+1)*chunk])
	}
	// The area after the last full one was zeroed; the record is cleared.
	last := (1 + 3*(epa+1)) * chunk
	require.True(t, blockdev.IsZero(img[last+16*(100-96):last+chunk]))
	require.True(t, blockdev.IsZero(img[len(img)-1024:]))
	img2, err := LoadPersistent(cow)
	require.NoError(t, err)
	require.Len(t, img2.Entries, 100)
}

func TestOpenErrors(t *testing.T) {
	o := newOrigin(t, blockdevtest.NewMem(t, 64<<10, 512))
	image := func(edit func(img []byte)) *blockdev.Mem {
		img := make([]byte, 64<<10)
		putKernelHeader(img, 1, 1, 8)
		edit(img)
		return memFrom(t, img, 512)
	}
	cases := []struct {
		name string
		dev  *blockdev.Mem
		want error
	}{
		{"zeros", blockdevtest.NewMem(t, 64<<10, 512), ErrBadHeader},
		{"magic", image(func(b []byte) { b[0] = 'X' }), ErrBadMagic},
		{"version", image(func(b []byte) { b[8] = 2 }), ErrBadHeader},
		{"chunk not a power of two", image(func(b []byte) { b[12] = 3 }), ErrChunkSize},
		{"chunk zero", image(func(b []byte) { b[12] = 0 }), ErrChunkSize},
		{"chunk above 1 GiB", image(func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 1<<22) }), ErrChunkSize},
		{"chunk larger than device", image(func(b []byte) { b[12], b[13] = 0, 1 }), ErrBadHeader},
		{"new beyond device", image(func(b []byte) { putKernelPair(b, 4096, 0, 0, kpair{1, 99}) }), ErrCorrupt},
		{"new at metadata", image(func(b []byte) { putKernelPair(b, 4096, 0, 0, kpair{1, 1}) }), ErrCorrupt},
		{"new twice", image(func(b []byte) {
			putKernelPair(b, 4096, 0, 0, kpair{1, 2})
			putKernelPair(b, 4096, 0, 1, kpair{2, 2})
		}), ErrCorrupt},
		{"old beyond origin", image(func(b []byte) { putKernelPair(b, 4096, 0, 0, kpair{16, 2}) }), ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := o.OpenSnapshot(c.dev, Options{})
			require.ErrorIs(t, err, c.want)
		})
	}
	for _, cs := range []int64{3000, 256, 2 << 30} {
		_, err := o.CreateSnapshot(blockdevtest.NewMem(t, 64<<10, 512), Options{ChunkSize: cs, Persistent: true})
		require.ErrorIs(t, err, ErrChunkSize, "chunk size %d", cs)
	}
	_, err := o.CreateSnapshot(blockdevtest.NewMem(t, 64<<10, 4096), Options{ChunkSize: 512})
	require.ErrorIs(t, err, ErrChunkSize, "chunk smaller than the COW block")
	_, err = o.CreateSnapshot(blockdevtest.NewMem(t, 8<<10, 512), Options{ChunkSize: 4096, Persistent: true})
	require.ErrorIs(t, err, ErrNoSpace)
	require.Empty(t, o.Snapshots())
}

// hookDev calls before on every write, then writes.
type hookDev struct {
	blockdev.Device
	before func(p []byte, off int64)
}

func (h *hookDev) WriteAt(p []byte, off int64) (int, error) {
	h.before(p, off)
	return h.Device.WriteAt(p, off)
}

func TestTornAreaWriteIsRepaired(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			const chunk = 4096
			mem := blockdevtest.NewMem(t, 1<<20, bs)
			var frozen *blockdev.Mem
			areaWrites := 0
			cow := &hookDev{Device: mem, before: func(p []byte, off int64) {
				if off >= chunk && off < 2*chunk { // area 0
					areaWrites++
					if areaWrites == 3 {
						// Power fails with this write in flight: the block
						// it covers is torn to garbage.
						frozen = mem.Clone()
						garbage := make([]byte, len(p))
						for i := range garbage {
							garbage[i] = byte(i*31 + 7)
						}
						_, _ = frozen.WriteAt(garbage, off)
					}
				}
			}}
			o := newOrigin(t, blockdevtest.NewMem(t, 1<<20, bs))
			s, err := o.CreateSnapshot(cow, Options{ChunkSize: chunk, Persistent: true})
			require.NoError(t, err)
			areaWrites = 0                                        // formatting zeroed area 0
			mustWrite(t, o, blockdevtest.Fill(1, chunk), 0)       // area write 1
			mustWrite(t, o, blockdevtest.Fill(1, chunk), 5*chunk) // area write 2
			mustWrite(t, o, blockdevtest.Fill(1, chunk), 9*chunk) // area write 3: torn
			require.NotNil(t, frozen)
			require.NoError(t, s.Close())

			// CheckCOW sees the torn write, through a read-only view.
			crep, err := CheckCOW(blockdev.ReadOnly(frozen), 1<<20)
			require.NoError(t, err)
			require.True(t, crep.PendingRepair, "%q", crep.Problems)
			require.Equal(t, uint64(0), crep.RepairArea)

			o2 := newOrigin(t, blockdevtest.NewMem(t, 1<<20, bs))
			s2, err := o2.OpenSnapshot(frozen, Options{})
			require.NoError(t, err)
			var got []Exception
			s2.st.entries(func(l []Exception) { got = append(got, l...) })
			require.Equal(t, []Exception{{0, 2}, {5, 3}}, got, "the torn batch is undone, the ones before it kept")
			rep, err := s2.Check()
			require.NoError(t, err)
			require.Zero(t, rep.Leaked)
			crep, err = CheckCOW(frozen, 1<<20)
			require.NoError(t, err)
			require.True(t, crep.OK(), "%q", crep.Problems)
		})
	}
}
