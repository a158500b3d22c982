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
// from. (The crash torture's failures in docs/metadata.md section 29.)
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
