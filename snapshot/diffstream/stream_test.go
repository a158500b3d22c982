package diffstream

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

func TestFullExportIsSparseAndCoversTheVolume(t *testing.T) {
	v := newVolume(t, 1, 1<<20)
	v.scribble(20)
	s := v.snapshot()
	stream := exportFull(t, s, 0)
	h, tot, err := readStream(stream)
	require.NoError(t, err)
	require.True(t, h.Full())
	require.Equal(t, int64(1<<20), h.VolumeSize)
	require.Equal(t, int64(1<<20), tot.DataBytes+tot.ZeroBytes, "a full export covers every byte")
	require.Less(t, tot.DataBytes, int64(1<<20), "holes travel as ZERO records")
	require.Less(t, int64(len(stream)), tot.DataBytes+64*tot.Records+200)
}

func TestRoundTripFullOntoDirtyTarget(t *testing.T) {
	v := newVolume(t, 2, 1<<20)
	v.scribble(30)
	s := v.snapshot()
	stream := exportFull(t, s, 0)

	target := newVolume(t, 99, 1<<20)
	target.scribble(50) // garbage the full stream must overwrite
	state := t.TempDir() + "/t.bsstate"
	res, err := Apply(context.Background(), bytes.NewReader(stream), target.live, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	require.False(t, res.NoOp)
	requireSame(t, s, target.live)
	st, err := ReadState(state)
	require.NoError(t, err)
	require.Equal(t, &Identity{ID: ident(0).ID, Name: ident(0).Name}, st.At)
	require.Nil(t, st.Partial)

	// Re-applying a completed stream is a no-op.
	res, err = Apply(context.Background(), bytes.NewReader(stream), target.live, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	require.True(t, res.NoOp)
	require.Zero(t, res.Applied)
}

// Full, then three incrementals, onto a blank file: equal to the last
// snapshot byte for byte. Out-of-order incrementals are refused.
func TestRoundTripIncrementals(t *testing.T) {
	v := newVolume(t, 3, 2<<20)
	v.scribble(40)
	snaps := []*blockdev.Mem{v.snapshot()}
	for range 3 {
		v.scribble(15)
		snaps = append(snaps, v.snapshot())
	}
	path := t.TempDir() + "/target.img"
	target, err := blockdev.Create(path, 2<<20, blockdev.FileOptions{})
	require.NoError(t, err)
	defer target.Close()
	opts := ApplyOptions{StatePath: DefaultStatePath(path)}
	ctx := context.Background()

	// An incremental onto a target of unknown state is refused.
	_, err = Apply(ctx, bytes.NewReader(exportIncr(t, snaps[0], snaps[1], 0, 1)), target, opts)
	require.ErrorIs(t, err, ErrMismatch)

	_, err = Apply(ctx, bytes.NewReader(exportFull(t, snaps[0], 0)), target, opts)
	require.NoError(t, err)
	requireSame(t, snaps[0], target)

	// 1 -> 2 onto a target at 0 is refused and changes nothing.
	_, err = Apply(ctx, bytes.NewReader(exportIncr(t, snaps[1], snaps[2], 1, 2)), target, opts)
	require.ErrorIs(t, err, ErrMismatch)
	require.Contains(t, err.Error(), "target is at snap0")
	requireSame(t, snaps[0], target)

	for i := 1; i <= 3; i++ {
		res, err := Apply(ctx, bytes.NewReader(exportIncr(t, snaps[i-1], snaps[i], i-1, i)), target, opts)
		require.NoError(t, err, "incremental %d", i)
		require.Positive(t, res.Applied)
		requireSame(t, snaps[i], target)
	}
	st, err := ReadState(opts.StatePath)
	require.NoError(t, err)
	require.Equal(t, ident(3).ID, st.At.ID)

	// Forced: an old incremental applies anyway (and the state follows it).
	_, err = Apply(ctx, bytes.NewReader(exportIncr(t, snaps[0], snaps[1], 0, 1)), target, ApplyOptions{StatePath: opts.StatePath, Force: true})
	require.NoError(t, err)
	st, err = ReadState(opts.StatePath)
	require.NoError(t, err)
	require.Equal(t, ident(1).ID, st.At.ID)
}

func TestExportFromAllocationMap(t *testing.T) {
	m, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	p := bytes.Repeat([]byte{7}, 8192)
	_, err = m.WriteAt(p, 1<<20)
	require.NoError(t, err)
	var buf bytes.Buffer
	var last Progress
	tot, err := Export(context.Background(), &buf, m, Header{To: ident(0)}, nil, func(p Progress) { last = p })
	require.NoError(t, err)
	require.Equal(t, Totals{Records: 3, DataBytes: 8192, ZeroBytes: 8<<20 - 8192}, tot)
	require.Equal(t, int64(8<<20), last.Done)
	require.Equal(t, int64(8<<20), last.Total)
}

func TestLargeExtentsSplitIntoMaxDataRecords(t *testing.T) {
	m, err := blockdev.NewMem(10<<20, 4096)
	require.NoError(t, err)
	p := bytes.Repeat([]byte{1}, 10<<20)
	_, err = m.WriteAt(p, 0)
	require.NoError(t, err)
	stream := exportFull(t, m, 0)
	r, err := NewReader(bytes.NewReader(stream))
	require.NoError(t, err)
	var lens []int64
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		lens = append(lens, rec.Len)
	}
	require.Equal(t, []int64{MaxData, MaxData, 2 << 20}, lens)
}

func TestExportRejectsBadExtents(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	ctx := context.Background()
	seq := func(xs ...Extent) func(func(Extent, error) bool) {
		return func(yield func(Extent, error) bool) {
			for _, x := range xs {
				if !yield(x, nil) {
					return
				}
			}
		}
	}
	incr := Header{From: ident(0), To: ident(1)}
	_, err = Export(ctx, io.Discard, m, incr, nil, nil)
	require.ErrorContains(t, err, "needs the changed extents")
	_, err = Export(ctx, io.Discard, m, incr, seq(Extent{Off: 4096, Len: 512}, Extent{Off: 0, Len: 512}), nil)
	require.ErrorContains(t, err, "out of order")
	_, err = Export(ctx, io.Discard, m, incr, seq(Extent{Off: 100, Len: 512}), nil)
	require.ErrorContains(t, err, "not aligned")
	_, err = Export(ctx, io.Discard, m, incr, seq(Extent{Off: 1 << 20, Len: 512}), nil)
	require.ErrorContains(t, err, "outside the volume")
	_, err = Export(ctx, io.Discard, m, Header{From: ident(0)}, seq(), nil)
	require.ErrorContains(t, err, "To snapshot has no ID")
	boom := errors.New("boom")
	_, err = Export(ctx, io.Discard, m, incr, func(yield func(Extent, error) bool) { yield(Extent{}, boom) }, nil)
	require.ErrorIs(t, err, boom)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = Export(cctx, io.Discard, m, Header{To: ident(0)}, seq(Extent{Off: 0, Len: 4096}), nil)
	require.ErrorIs(t, err, context.Canceled)
}

// A newer writer's unknown record types are verified and skipped.
func TestUnknownRecordsAreSkipped(t *testing.T) {
	m, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{VolumeSize: 64 << 10, BlockSize: 512, To: ident(0), Flags: FlagFull})
	require.NoError(t, err)
	require.NoError(t, w.WriteZero(0, 32<<10))
	require.NoError(t, w.writeRaw(77, []byte("a record from the future")))
	require.NoError(t, w.WriteData(32<<10, bytes.Repeat([]byte{5}, 32<<10)))
	require.NoError(t, w.writeRaw(200, nil))
	tot, err := w.Close()
	require.NoError(t, err)
	require.Equal(t, int64(4), tot.Records)

	r, err := NewReader(bytes.NewReader(buf.Bytes()))
	require.NoError(t, err)
	var n int
	for {
		_, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		n++
	}
	require.Equal(t, 2, n)
	require.Equal(t, int64(2), r.Skipped())
	require.Equal(t, tot, r.Totals())

	_, err = Apply(context.Background(), bytes.NewReader(buf.Bytes()), m, ApplyOptions{})
	require.NoError(t, err)
	got := image(t, m)
	require.Equal(t, bytes.Repeat([]byte{5}, 32<<10), got[32<<10:])
}

// rewriteHeader returns stream with its header replaced by edit's result
// (the CRC recomputed).
func rewriteHeader(stream []byte, edit func([]byte) []byte) []byte {
	n := int(binary.LittleEndian.Uint16(stream[10:]))
	h := edit(append([]byte(nil), stream[:n-4]...))
	binary.LittleEndian.PutUint16(h[10:], uint16(len(h)+4))
	h = binary.LittleEndian.AppendUint32(h, crc32.Checksum(h, castagnoli))
	return append(h, stream[n:]...)
}

func TestHeaderVersionAndExtension(t *testing.T) {
	m, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	stream := exportFull(t, m, 0)

	newer := rewriteHeader(stream, func(h []byte) []byte {
		binary.LittleEndian.PutUint16(h[8:], 3)
		return h
	})
	_, err = NewReader(bytes.NewReader(newer))
	require.ErrorIs(t, err, ErrVersion)
	require.ErrorContains(t, err, "stream version 3, this reader knows versions 1 and 2")

	// Version 2 is compression and only that.
	v2 := rewriteHeader(stream, func(h []byte) []byte {
		binary.LittleEndian.PutUint16(h[8:], 2)
		return h
	})
	_, err = NewReader(bytes.NewReader(v2))
	require.ErrorIs(t, err, ErrCorrupt)

	// Extra header fields of this version are skipped. (The stream CRC in
	// END covers the header, so the rest is re-encoded too.)
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{VolumeSize: 64 << 10, BlockSize: 512, To: ident(0), Flags: FlagFull})
	require.NoError(t, err)
	require.NoError(t, w.WriteZero(0, 64<<10))
	_, err = w.Close()
	require.NoError(t, err)
	// An extension field of an unknown tag is skipped; one that runs past
	// the header is corrupt.
	ext := rewriteHeader(buf.Bytes(), func(h []byte) []byte {
		h = binary.LittleEndian.AppendUint16(h, 0x7fff)
		h = binary.LittleEndian.AppendUint16(h, 13)
		return append(h, "future fields"...)
	})
	r, err := NewReader(bytes.NewReader(ext))
	require.NoError(t, err)
	require.Equal(t, ident(0), r.Header().To)
	bad := rewriteHeader(buf.Bytes(), func(h []byte) []byte { return append(h, "future fields"...) })
	_, err = NewReader(bytes.NewReader(bad))
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, "runs past the header")

	_, err = NewReader(bytes.NewReader([]byte("not a stream at all, not at all")))
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, "bad magic")
}

// Every single-byte corruption and every truncation of a small stream is
// detected, as a *CorruptError (or ErrVersion) with an offset inside the
// stream.
func TestCorruptionAtEveryByteIsDetected(t *testing.T) {
	v := newVolume(t, 4, 64<<10)
	v.scribble(2)
	a := v.snapshot()
	v.scribble(1)
	b := v.snapshot()
	for name, stream := range map[string][]byte{"full": exportFull(t, a, 0), "incremental": exportIncr(t, a, b, 0, 1)} {
		t.Run(name, func(t *testing.T) {
			_, _, err := readStream(stream)
			require.NoError(t, err)
			t.Logf("stream of %d bytes", len(stream))
			bad := make([]byte, len(stream))
			for i := range stream {
				for _, flip := range []byte{0x01, 0x80, 0xff} {
					copy(bad, stream)
					bad[i] ^= flip
					_, _, err := readStream(bad)
					if err == nil {
						t.Fatalf("flip %#x at byte %d of %d not detected", flip, i, len(stream))
					}
					var ce *CorruptError
					if errors.As(err, &ce) {
						require.LessOrEqual(t, ce.Offset, int64(len(stream)))
					} else {
						require.ErrorIs(t, err, ErrVersion, "byte %d", i)
					}
				}
			}
			for n := range len(stream) {
				_, _, err := readStream(stream[:n])
				require.ErrorIs(t, err, ErrCorrupt, "truncated at %d", n)
			}
		})
	}
}
