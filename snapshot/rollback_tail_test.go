package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestRollbackSmallerPowerCut rolls a clone back to a snapshot smaller
// than it whose last chunk is partial, with a power cut at each device
// call in turn under every policy. The snapshot's parent point holds
// stale data past the snapshot's end in that chunk (the parent was shrunk
// into it before the snapshot was taken); the clone has since been grown,
// which zeroed that range, and written there. Rollback makes the chunk
// inherit again, so the stale data is below the clone's view: a crash
// between that and the size change must not show it. After the cut the
// clone has its old size and contents, or the snapshot's size and
// contents; never the parent's discarded tail. Both ways in: a rollback to
// the clone's own snapshot, and a reset to the snapshot it was cloned
// from. (The crash torture's failures: docs/metadata.md sections 29 and 30.)
func TestRollbackSmallerPowerCut(t *testing.T) {
	const cs, bs = 8 << 10, 4096
	const small, big = cs + cs/2, 3 * cs // the snapshot's size, the clone's
	aa, bb := bytes.Repeat([]byte{0xAA}, big), bytes.Repeat([]byte{0xBB}, big-small)
	for _, own := range []bool{false, true} {
		for _, pol := range blockdevtest.AllPolicies(11) {
			for k := 1; ; k++ {
				what := fmt.Sprintf("own %v %v k %d", own, pol, k)
				sSim := blockdevtest.MustCrashSim(2<<20, bs)
				opts := Options{ChunkSize: cs, JournalSize: 64 << 10, CommitInterval: -1, treeLeaves: 1}
				s, err := Format(nil, sSim, opts)
				require.NoError(t, err)
				a, err := s.CreateVolume("a", big)
				require.NoError(t, err)
				_, err = a.WriteAt(aa, 0)
				require.NoError(t, err)
				require.NoError(t, s.Resize("a", small, ResizeOptions{Shrink: true})) // chunk 1's second half: stale 0xAA
				sa, err := s.CreateSnapshot("sa", a)
				require.NoError(t, err)
				c, err := s.CreateClone("c", sa)
				require.NoError(t, err)
				target := "sa"
				if own {
					_, err = s.CreateSnapshot("sc", c) // sees the parent point in chunk 1
					require.NoError(t, err)
					target = "sc"
				}
				require.NoError(t, s.Resize("c", big, ResizeOptions{})) // zeroes chunk 1's tail in c
				_, err = c.WriteAt(bb, small)
				require.NoError(t, err)
				require.NoError(t, c.Flush())
				require.NoError(t, s.Close())

				tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, pol)
				s, err = Open(nil, tr.Device("store", sSim), opts)
				require.NoError(t, err)
				c, err = s.OpenVolume("c")
				require.NoError(t, err)
				to, err := s.OpenVolume(target)
				require.NoError(t, err)
				tr.Arm(blockdevtest.OpAny, k)
				err = s.Rollback(context.Background(), c, to)
				fired := tr.Fired()
				out := tr.Cut()
				_ = s.Close()
				if !fired {
					require.NoError(t, err, what)
				}

				s2, err := Open(nil, out[0], opts)
				require.NoError(t, err, what)
				require.NoError(t, s2.Check(), what)
				v, err := s2.OpenVolume("c")
				require.NoError(t, err, what)
				buf := make([]byte, v.Size())
				_, err = v.ReadAt(buf, 0)
				require.NoError(t, err, what)
				require.Contains(t, []int64{small, big}, v.Size(), what)
				require.True(t, bytes.Equal(aa[:small], buf[:small]), what)
				if v.Size() == big {
					tail := buf[small:]
					require.True(t, bytes.Equal(bb, tail), "%s: the clone kept its size; its tail must be its own, not %x...", what, tail[:8])
				}
				require.NoError(t, s2.Close())
				if !fired {
					break
				}
			}
		}
	}
}

// TestRollbackSmallerFreesTail: a rollback or reset to a smaller snapshot
// frees the store chunks the volume wrote past the snapshot's end (they
// are past its new end: nothing reads them), so the store's used space is
// back to what it was before they were written, and a later grow reads
// zeros there.
func TestRollbackSmallerFreesTail(t *testing.T) {
	const cs = 8 << 10
	for _, own := range []bool{false, true} {
		s, err := Format(nil, blockdevtest.MustCrashSim(4<<20, 4096), Options{ChunkSize: cs, CommitInterval: -1})
		require.NoError(t, err)
		a, err := s.CreateVolume("a", 2*cs)
		require.NoError(t, err)
		_, err = a.WriteAt(bytes.Repeat([]byte{0xAA}, 2*cs), 0)
		require.NoError(t, err)
		target, err := s.CreateSnapshot("sa", a)
		require.NoError(t, err)
		v := a
		if !own {
			v, err = s.CreateClone("c", target)
			require.NoError(t, err)
		} else {
			_, err = a.WriteAt(bytes.Repeat([]byte{0xBB}, 2*cs), 0) // a's own copies, which the rollback rewrites
			require.NoError(t, err)
		}
		name := map[bool]string{false: "c", true: "a"}[own]
		before := s.Stats().UsedBytes
		require.NoError(t, s.Resize(name, 6*cs, ResizeOptions{}))
		_, err = v.WriteAt(bytes.Repeat([]byte{0xCC}, 4*cs), 2*cs)
		require.NoError(t, err)
		require.Equal(t, before+4*cs, s.Stats().UsedBytes)
		require.NoError(t, s.Rollback(context.Background(), v, target))
		require.EqualValues(t, 2*cs, v.Size())
		require.NoError(t, s.Checkpoint(context.Background())) // frees are reusable once a tree commit is durable
		require.Equal(t, before, s.Stats().UsedBytes, "own %v: the chunks written past the snapshot's end are freed", own)
		st, err := s.Stat(name)
		require.NoError(t, err)
		require.LessOrEqual(t, st.Mapped, int64(2*cs), "own %v: nothing mapped past the end", own)
		mustCheck(t, s)
		require.NoError(t, s.Resize(name, 6*cs, ResizeOptions{}))
		buf := make([]byte, 6*cs)
		_, err = v.ReadAt(buf, 0)
		require.NoError(t, err)
		require.True(t, bytes.Equal(bytes.Repeat([]byte{0xAA}, 2*cs), buf[:2*cs]))
		require.True(t, bytes.Equal(make([]byte, 4*cs), buf[2*cs:]), "own %v: a grow after reads zeros", own)
		mustCheck(t, s)
		require.NoError(t, s.Close())
	}
}
