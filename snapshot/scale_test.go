package snapshot

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// stamp fills a chunk-sized buffer with a value derived from v.
func stamp(p []byte, v uint64) {
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], v*0x9E3779B97F4A7C15+uint64(i))
	}
}

// TestScaleSnapshots takes 10,000 snapshots of one origin, writing one chunk
// before each, and checks every snapshot (three chunks each, all of a few)
// before and after a reopen.
func TestScaleSnapshots(t *testing.T) {
	const nsnap, cs = 10000, 4096
	origin, _ := blockdev.NewMem(1<<20, 512)
	store, _ := blockdev.NewMem(64<<20, 512)
	chunks := uint64(origin.Size() / cs)
	opts := Options{ChunkSize: cs, JournalSize: 4 << 20}
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	o := s.Origin()
	buf := make([]byte, cs)
	for i := uint64(1); i <= nsnap; i++ {
		stamp(buf, i)
		_, err := o.WriteAt(buf, int64(i%chunks)*cs)
		require.NoError(t, err)
		_, err = s.CreateSnapshot(fmt.Sprintf("s%d", i), o)
		require.NoError(t, err)
	}
	// At snapshot k, chunk c holds the last i <= k with i%chunks == c.
	want := func(k, c uint64) uint64 {
		if k < c {
			return 0
		}
		return k - (k-c)%chunks
	}
	verify := func(s *Store) {
		got, exp := make([]byte, cs), make([]byte, cs)
		zero := make([]byte, cs)
		for k := uint64(1); k <= nsnap; k++ {
			v, err := s.OpenVolume(fmt.Sprintf("s%d", k))
			require.NoError(t, err)
			cs3 := []uint64{k % chunks, (k + 1) % chunks, (k * 7) % chunks}
			if k%2000 == 0 {
				cs3 = cs3[:0]
				for c := range chunks {
					cs3 = append(cs3, c)
				}
			}
			for _, c := range cs3 {
				_, err := v.ReadAt(got, int64(c)*cs)
				require.NoError(t, err)
				if w := want(k, c); w == 0 {
					copy(exp, zero) // the origin's initial contents
				} else {
					stamp(exp, w)
				}
				require.Equal(t, exp, got, "snapshot %d chunk %d", k, c)
			}
		}
	}
	verify(s)
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
	s, err = Open(origin, store, opts)
	require.NoError(t, err)
	defer s.Close()
	verify(s)
	require.NoError(t, s.Check())
	require.Len(t, s.List(), nsnap+1)
}

// TestScaleCloneChain builds a chain of 100 clones, each a clone of the
// previous one that writes one chunk, and checks every level.
func TestScaleCloneChain(t *testing.T) {
	const depth, cs = 100, 4096
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs})
	_ = store
	chunks := uint64(origin.Size() / cs)
	initial := make([]byte, origin.Size())
	_, err := origin.ReadAt(initial, 0)
	require.NoError(t, err)
	model := append([]byte(nil), initial...)
	models := make([][]byte, depth+1)
	vols := make([]*Volume, depth+1)
	vols[0] = s.Origin()
	buf := make([]byte, cs)
	for l := 1; l <= depth; l++ {
		c, err := s.CreateClone(fmt.Sprintf("c%d", l), vols[l-1])
		require.NoError(t, err)
		stamp(buf, uint64(l))
		off := int64(uint64(l*3)%chunks) * cs
		_, err = c.WriteAt(buf, off)
		require.NoError(t, err)
		copy(model[off:], buf)
		vols[l], models[l] = c, append([]byte(nil), model...)
	}
	got := make([]byte, origin.Size())
	for l := 1; l <= depth; l++ {
		_, err := vols[l].ReadAt(got, 0)
		require.NoError(t, err)
		require.Equal(t, models[l], got, "clone at depth %d", l)
	}
	// The origin changes under the chain; no clone sees it.
	_, err = vols[0].WriteAt(make([]byte, 64<<10), 0)
	require.NoError(t, err)
	_, err = vols[depth].ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, models[depth], got)
	mustCheck(t, s)
}
