package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestConcurrentWriters runs writers on the origin and on clones (each on
// its own region, so the final contents are known) while snapshots are
// taken and deleted, and a snapshot taken while they are paused is checked
// exactly at the end. Run with -race.
func TestConcurrentWriters(t *testing.T) {
	seed := blockdevtest.Seed(t)
	s, origin, _ := newMemStore(t, 1<<20, 32<<20, Options{ChunkSize: 4 << 10, JournalSize: 256 << 10})
	o := s.Origin()
	base, err := s.CreateSnapshot("base", o)
	require.NoError(t, err)
	c1, err := s.CreateClone("c1", base)
	require.NoError(t, err)
	c2, err := s.CreateClone("c2", c1)
	require.NoError(t, err)
	vols := []*Volume{o, c1, c2}
	models := make([][]byte, len(vols))
	for i, v := range vols {
		models[i] = make([]byte, origin.Size())
		_, err := v.ReadAt(models[i], 0)
		require.NoError(t, err)
	}
	const writers = 4
	region := origin.Size() / writers
	var wg sync.WaitGroup
	errs := make(chan error, writers*len(vols)+1)
	for vi, v := range vols {
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(vi*writers+w)))
				for range 150 {
					off := int64(w)*region + rng.Int64N(region/4096-4)*4096
					p := make([]byte, (1+rng.Int64N(4))*4096)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					if _, err := v.WriteAt(p, off); err != nil {
						errs <- err
						return
					}
					copy(models[vi][off:], p)
				}
			}()
		}
	}
	wg.Add(1)
	go func() { // snapshots come and go under the writers
		defer wg.Done()
		for i := range 30 {
			v := vols[i%len(vols)]
			name := fmt.Sprintf("t%d", i)
			if _, err := s.CreateSnapshot(name, v); err != nil {
				errs <- err
				return
			}
			if i%2 == 1 {
				if _, err := s.Delete(fmt.Sprintf("t%d", i-1)); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	got := make([]byte, origin.Size())
	for i, v := range vols {
		_, err := v.ReadAt(got, 0)
		require.NoError(t, err)
		require.True(t, bytes.Equal(models[i], got), "volume %d", i)
	}
	final, err := s.CreateSnapshot("final", c2)
	require.NoError(t, err)
	_, err = c2.WriteAt(make([]byte, 64<<10), 0)
	require.NoError(t, err)
	_, err = final.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(models[2], got))
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Check())
	_ = blockdev.IsZero
}
