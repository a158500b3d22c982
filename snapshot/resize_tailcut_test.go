package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestResizeTailPowerCut shrinks a clone into the middle of a chunk, commits
// the tree and grows it back, with a power cut at each device call in turn
// under every policy, with and without a snapshot of the clone (a grow's
// zeroing then redirects). After the cut the clone is either not shrunk
// (its old data), shrunk, or grown with the rest of the old last chunk
// zeros: never the old data in a grown range. (A suspect of the crash
// torture's failures in docs/metadata.md section 29; it passes.)
func TestResizeTailPowerCut(t *testing.T) {
	const cs = 8 << 10
	for _, snap := range []bool{false, true} {
		for _, pol := range blockdevtest.AllPolicies(7) {
			for k := 1; ; k++ {
				oSim := blockdevtest.MustCrashSim(300<<10, 4096)
				sSim := blockdevtest.MustCrashSim(2<<20, 4096)
				opts := Options{ChunkSize: cs, JournalSize: 64 << 10, CommitInterval: -1}
				s, err := Format(oSim, sSim, opts)
				require.NoError(t, err)
				c, err := s.CreateClone("c", s.Origin())
				require.NoError(t, err)
				_, err = c.WriteAt(bytes.Repeat([]byte{0xAA}, 3*cs), 0)
				require.NoError(t, err)
				require.NoError(t, c.Flush())
				if snap {
					_, err = s.CreateSnapshot("s", c)
					require.NoError(t, err)
				}
				require.NoError(t, s.Checkpoint(context.Background()))
				tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, pol)
				require.NoError(t, s.Close())
				s, err = Open(tr.Device("origin", oSim), tr.Device("store", sSim), opts)
				require.NoError(t, err)
				tr.Arm(blockdevtest.OpAny, k)
				err = s.Resize("c", cs+cs/2, ResizeOptions{Shrink: true})
				if err == nil {
					err = s.Checkpoint(context.Background())
				}
				if err == nil {
					err = s.Resize("c", 3*cs, ResizeOptions{})
				}
				fired := tr.Fired()
				out := tr.Cut()
				_ = s.Close()
				s2, err2 := Open(out[0], out[1], opts)
				require.NoError(t, err2)
				v, err2 := s2.OpenVolume("c")
				require.NoError(t, err2)
				buf := make([]byte, v.Size())
				_, err2 = v.ReadAt(buf, 0)
				require.NoError(t, err2)
				n := len(buf)
				if n > cs+cs/2 {
					require.Equal(t, bytes.Repeat([]byte{0xAA}, cs+cs/2), buf[:cs+cs/2], "snap %v %v k %d", snap, pol, k)
					tail := buf[cs+cs/2 : 3*cs]
					ok := n == 3*cs && bytes.Equal(make([]byte, len(tail)), tail) || n > 3*cs && bytes.Equal(bytes.Repeat([]byte{0xAA}, len(tail)), tail)
					require.True(t, ok, "snap %v %v k %d: tail neither zero nor the old data (err %v); size %d, tail %x...%x", snap, pol, k, err, n, tail[:8], tail[len(tail)-8:])
				}
				require.NoError(t, s2.Check())
				require.NoError(t, s2.Close())
				if !fired {
					break
				}
			}
		}
	}
}
