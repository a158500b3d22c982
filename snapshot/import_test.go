package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// plainDevice hides a device's optional interfaces (AllocationMapper).
type plainDevice struct{ blockdev.Device }

// sparseImage is a device of 64 chunks of cs bytes: data in chunks 3, 10
// and 40 (and half of 41), zeros written into 20 and 21, holes elsewhere.
func sparseImage(t *testing.T, cs int64) *blockdev.Mem {
	t.Helper()
	img, err := blockdev.NewMem(64*cs, 512)
	require.NoError(t, err)
	for _, c := range []int64{3, 10, 40} {
		fill(t, img, byte(c), c*cs, cs)
	}
	fill(t, img, 0x41, 41*cs, cs/2)
	_, err = img.WriteAt(make([]byte, 2*cs), 20*cs)
	require.NoError(t, err)
	return img
}

// Import copies only the chunks that hold data, whether the source says
// where its holes are or not, and the volume reads as the source.
func TestImport(t *testing.T) {
	const cs = 16 << 10
	for _, tc := range []struct {
		name string
		src  func(*blockdev.Mem) blockdev.Device
	}{
		{"mapper", func(m *blockdev.Mem) blockdev.Device { return m }},
		{"zero-test", func(m *blockdev.Mem) blockdev.Device { return plainDevice{m} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, store := newPool(t, 16<<20, Options{ChunkSize: cs})
			img := sparseImage(t, cs)
			var last int64
			v, err := s.Import(t.Context(), "golden", tc.src(img), ImportOptions{Progress: func(done, total int64) {
				require.Equal(t, img.Size(), total)
				last = done
			}})
			require.NoError(t, err)
			require.Equal(t, img.Size(), last)
			require.Equal(t, KindVolume, v.Kind())
			require.Equal(t, img.Size(), v.Size())
			require.Equal(t, readAll(t, img), readAll(t, v))
			require.Equal(t, int64(4*cs), s.Stats().UsedBytes, "only the chunks with data take space")
			require.Len(t, s.List(), 1)
			require.Equal(t, "golden", s.List()[0].Name)
			mustCheck(t, s)

			_, err = s.Import(t.Context(), "golden", img, ImportOptions{})
			require.ErrorIs(t, err, ErrExists)
			require.NoError(t, s.Close())
			s2, err := Open(nil, store, Options{})
			require.NoError(t, err)
			defer s2.Close()
			v2, err := s2.OpenVolume("golden")
			require.NoError(t, err)
			require.Equal(t, readAll(t, img), readAll(t, v2))
		})
	}
}

// A failed or canceled import leaves no volume; one a crash cut short is
// deleted by the next Open.
func TestImportInterrupted(t *testing.T) {
	const cs = 16 << 10
	s, store := newPool(t, 16<<20, Options{ChunkSize: cs})
	img := sparseImage(t, cs)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := s.Import(ctx, "golden", img, ImportOptions{})
	require.ErrorIs(t, err, context.Canceled)
	require.NoError(t, s.WaitIdle(t.Context()))
	require.Empty(t, s.List())

	odd, err := blockdev.NewMem(64<<10+512, 512)
	require.NoError(t, err)
	_, err = s.Import(t.Context(), "odd", odd, ImportOptions{})
	require.ErrorIs(t, err, ErrBadOptions, "a size that is not whole volume blocks")
	require.Empty(t, s.List())

	// A crash mid-import: the volume under its import name, half filled.
	v, err := s.createVolume(importPrefix+"golden", img.Size())
	require.NoError(t, err)
	fill(t, v, 1, 0, 4*cs)
	require.NoError(t, v.Flush())
	crashed := crashImage(t, store)
	require.NoError(t, s.Close())

	ro, err := Open(nil, crashed, Options{ReadOnly: true})
	require.NoError(t, err)
	require.Equal(t, importPrefix+"golden", ro.List()[0].Name, "a read-only open lists it")
	require.NoError(t, ro.Close())

	s2, err := Open(nil, crashed, Options{})
	require.NoError(t, err)
	defer s2.Close()
	require.NoError(t, s2.WaitIdle(t.Context()))
	require.Empty(t, s2.List())
	require.Zero(t, s2.Stats().IndexEntries)
	mustCheck(t, s2)
	v2, err := s2.Import(t.Context(), "golden", img, ImportOptions{})
	require.NoError(t, err)
	require.True(t, bytes.Equal(readAll(t, img), readAll(t, v2)))
}
