package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

// A full export then incrementals, forward and compressed, restore a blank
// device to each snapshot in turn; the headers carry the volumes'
// identities; progress ends at its total, known from the start.
func TestExportDiffRestores(t *testing.T) {
	ctx := context.Background()
	s, _, _ := newMemStore(t, 4<<20, 16<<20, Options{ChunkSize: 16 << 10})
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	fillAt(t, o, 1, 0, 64<<10)
	fillAt(t, o, 2, 2<<20, 4096)
	require.NoError(t, o.Discard(1<<20, 48<<10))
	s2, err := s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	fillAt(t, o, 3, 3<<20, 32<<10)
	s3, err := s.CreateSnapshot("s3", o)
	require.NoError(t, err)

	target, err := blockdev.NewMem(o.Size(), 4096)
	require.NoError(t, err)
	state := t.TempDir() + "/state"
	apply := func(from, to *Volume, opts ExportOptions) diffstream.Result {
		var buf bytes.Buffer
		var last, total int64
		opts.Progress = func(done, tot int64) {
			require.GreaterOrEqual(t, done, last)
			if total != 0 {
				require.Equal(t, total, tot, "the total is known from the start")
			}
			last, total = done, tot
		}
		_, err := s.ExportDiff(ctx, &buf, from, to, opts)
		require.NoError(t, err)
		require.Equal(t, total, last)
		res, err := diffstream.Apply(ctx, &buf, target, diffstream.ApplyOptions{StatePath: state})
		require.NoError(t, err)
		eq, off, err := blockdev.Equal(ctx, to, target)
		require.NoError(t, err)
		require.True(t, eq, "restored %s differs at %d", to.Info().Name, off)
		require.Equal(t, to.Identity(), res.Header.To)
		if from != nil {
			require.Equal(t, from.Identity(), res.Header.From)
		}
		require.Equal(t, int(s.cs), res.Header.ChunkSize)
		return res
	}
	full := apply(nil, s1, ExportOptions{})
	require.Equal(t, o.Size(), full.Totals.DataBytes+full.Totals.ZeroBytes)
	incr := apply(s1, s2, ExportOptions{})
	require.Less(t, incr.Totals.DataBytes+incr.Totals.ZeroBytes, o.Size()/8, "an incremental carries the changes only")
	z := apply(s2, s3, ExportOptions{Compress: true})
	require.True(t, z.Header.Compressed())
	// Backwards in time: Diff's zero extents describe s3, not s1, so the
	// export reads them; the target goes back to s1 exactly.
	apply(s3, s1, ExportOptions{})
	apply(s1, s3, ExportOptions{})

}

func TestExportDiffRefusesLiveVolumes(t *testing.T) {
	ctx := context.Background()
	s, _, _ := newMemStore(t, 1<<20, 8<<20, Options{ChunkSize: 16 << 10})
	s1, err := s.CreateSnapshot("s1", s.Origin())
	require.NoError(t, err)
	c, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	var buf bytes.Buffer
	_, err = s.ExportDiff(ctx, &buf, nil, s.Origin(), ExportOptions{})
	require.ErrorIs(t, err, ErrBadOptions)
	_, err = s.ExportDiff(ctx, &buf, s1, c, ExportOptions{})
	require.ErrorIs(t, err, ErrBadOptions)
	_, err = s.ExportDiff(ctx, &buf, nil, nil, ExportOptions{})
	require.ErrorIs(t, err, ErrBadOptions)
	require.Zero(t, buf.Len())
}
