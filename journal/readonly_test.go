package journal

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// OpenReadOnly replays exactly what Open then replays, through a read-only
// view, and leaves every byte of the device as it was: no epoch, no cut of
// the torn tail a power cut left. The journal it returns refuses work.
func TestOpenReadOnlyReplaysWithoutWriting(t *testing.T) {
	ctx := context.Background()
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dev := blockdevtest.NewMem(t, 1<<20, bs)
			j, err := Format(dev, Options{CheckpointSize: 64 << 10})
			require.NoError(t, err)
			var all [][]byte
			for i := range 60 {
				p := recordPayload(i)
				_, err := j.Append(ctx, p)
				require.NoError(t, err)
				all = append(all, p)
				if i%10 == 9 && i < 50 {
					require.NoError(t, j.Commit(ctx))
				}
				if i == 29 {
					require.NoError(t, j.Checkpoint(ctx, j.LastSeq(), ckptWriter(all)))
				}
			}
			// Records 50-59 were appended, never committed: not on disk.
			require.NoError(t, j.Close())
			// A stale batch past the tail, as a torn write might leave:
			// Open cuts it (by epoch), a read-only open must leave it.
			tail := j.st.tail
			junk := bytes.Repeat([]byte{0x5a}, bs)
			_, err = dev.WriteAt(junk, j.logOff+tail%j.logSize)
			require.NoError(t, err)
			before := blockdevtest.ReadAll(t, dev)

			ro := &recorder{}
			rj, err := OpenReadOnly(blockdev.ReadOnly(dev), Options{}, ro)
			require.NoError(t, err)
			require.True(t, rj.ReadOnly())
			require.Equal(t, before, blockdevtest.ReadAll(t, dev), "read-only open wrote to the device")
			_, err = rj.Append(ctx, []byte("x"))
			require.ErrorIs(t, err, ErrReadOnly)
			require.ErrorIs(t, err, blockdev.ErrReadOnly)
			require.ErrorIs(t, rj.Checkpoint(ctx, rj.LastSeq(), func(w io.Writer) error { return nil }), ErrReadOnly)
			require.NoError(t, rj.Commit(ctx), "nothing to commit")
			require.Equal(t, uint64(50), rj.LastSeq())
			require.NoError(t, rj.Close())

			rw, r := reopen(t, dev, Options{})
			require.Equal(t, r.ckpt, ro.ckpt)
			require.Equal(t, r.seqs, ro.seqs)
			require.Equal(t, r.records, ro.records)
			require.Len(t, ro.seqs, 20, "records 31-50: after the checkpoint, up to the last commit")
			require.Equal(t, all[30:50], ro.records)
			require.Equal(t, rw.LastSeq(), rj.LastSeq())
			require.NoError(t, rw.Close())
			require.NotEqual(t, before, blockdevtest.ReadAll(t, dev), "a read-write open starts an epoch")
		})
	}
}
