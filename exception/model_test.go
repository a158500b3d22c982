package exception

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// modelSnap is a snapshot and what it must read.
type modelSnap struct {
	s     *Snapshot
	cow   blockdev.Device
	data  []byte
	small bool // may run out of COW space; never written through
}

// TestModelRandom runs random writes, discards, flushes, snapshot creates,
// deletes, reopens, merges and snapshot writes against a model: one byte
// slice per volume. Every volume is compared with its model as it goes.
func TestModelRandom(t *testing.T) {
	for i := range 6 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			seed := blockdevtest.Seed(t)
			runModel(t, seed, 250)
		})
	}
}

func runModel(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 3))
	const size = 512 << 10
	bs := []int{512, 4096}[rng.IntN(2)]
	o := newOrigin(t, blockdevtest.NewMem(t, size, bs))
	model := make([]byte, size)
	var snaps []*modelSnap
	randRange := func() (int64, int64) {
		blocks := int64(size / bs)
		off := rng.Int64N(blocks)
		n := 1 + rng.Int64N(min(48, blocks-off))
		return off * int64(bs), n * int64(bs)
	}
	pattern := func(n int64) []byte {
		p := make([]byte, n)
		b := byte(rng.Uint32())
		for i := range p {
			p[i] = b + byte(i/bs)
		}
		return p
	}
	verify := func(step int) {
		got := blockdevtest.ReadAll(t, o)
		require.Equal(t, -1, blockdevtest.FirstDiff(got, model), "origin differs at step %d (seed %d)", step, seed)
		for i, ms := range snaps {
			if ms.small && ms.s.State() == StateInvalid {
				_, err := ms.s.ReadAt(make([]byte, ms.s.BlockSize()), 0)
				require.ErrorIs(t, err, ErrInvalidSnapshot)
				continue
			}
			got := blockdevtest.ReadAll(t, ms.s)
			require.Equal(t, -1, blockdevtest.FirstDiff(got, ms.data), "snapshot %d differs at step %d (seed %d)", i, step, seed)
		}
	}
	for step := range steps {
		switch op := rng.IntN(24); {
		case op < 8:
			off, n := randRange()
			p := pattern(n)
			mustWrite(t, o, p, off)
			copy(model[off:], p)
		case op < 9:
			off, n := randRange()
			require.NoError(t, o.Discard(off, n))
			clear(model[off : off+n])
		case op < 11 && len(snaps) < 5:
			ms := &modelSnap{data: append([]byte(nil), model...), small: rng.IntN(4) == 0}
			cs := []int64{4096, 8192, 16384}[rng.IntN(3)]
			cowSize := int64(2 * size)
			if ms.small {
				cowSize = 6 * cs
			}
			ms.cow = blockdevtest.NewMem(t, cowSize, bs)
			s, err := o.CreateSnapshot(ms.cow, Options{ChunkSize: cs, Persistent: rng.IntN(2) == 0})
			require.NoError(t, err)
			ms.s = s
			snaps = append(snaps, ms)
		case op < 12 && len(snaps) > 0:
			i := rng.IntN(len(snaps))
			require.NoError(t, snaps[i].s.Delete())
			snaps = append(snaps[:i], snaps[i+1:]...)
		case op < 15 && len(snaps) > 0:
			ms := snaps[rng.IntN(len(snaps))]
			if ms.small {
				break
			}
			off, n := randRange()
			if rng.IntN(4) == 0 {
				require.NoError(t, ms.s.Discard(off, n))
				clear(ms.data[off : off+n])
			} else {
				p := pattern(n)
				mustWrite(t, ms.s, p, off)
				copy(ms.data[off:], p)
			}
		case op < 16:
			require.NoError(t, o.Flush())
		case op < 17 && len(snaps) > 0:
			i := rng.IntN(len(snaps))
			ms := snaps[i]
			if ms.s.State() != StateValid {
				break
			}
			var last MergeProgress
			require.NoError(t, ms.s.Merge(context.Background(), func(p MergeProgress) { last = p }))
			require.Zero(t, last.Remaining)
			require.Equal(t, StateClosed, ms.s.State())
			copy(model, ms.data)
			snaps = append(snaps[:i], snaps[i+1:]...)
		case op < 18 && len(snaps) > 0:
			ms := snaps[rng.IntN(len(snaps))]
			if !ms.s.persistent {
				break
			}
			// Close and open again: the store on the COW device is whole.
			require.NoError(t, ms.s.Close())
			s, err := o.OpenSnapshot(ms.cow, Options{})
			require.NoError(t, err)
			ms.s = s
		case op < 20:
			for _, ms := range snaps {
				if ms.s.State() == StateValid || ms.s.State() == StateOverflow {
					rep, err := ms.s.Check()
					require.NoError(t, err, "seed %d", seed)
					require.Zero(t, rep.Leaked)
				}
			}
		default:
			verify(step)
		}
	}
	verify(steps)
	require.NoError(t, o.Close())
}
