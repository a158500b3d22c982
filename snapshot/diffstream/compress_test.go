package diffstream

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// A compressed full and incremental stream round-trip, are smaller than
// their uncompressed twins on compressible data, and carry version 2;
// uncompressed streams stay version 1 so readers that know only version 1
// still read them.
func TestCompressedRoundTrip(t *testing.T) {
	v := newVolume(t, 11, 1<<20)
	v.scribble(20)
	// Compressible data: a repeated text.
	_, err := v.live.WriteAt(bytes.Repeat([]byte("blocksnap compresses "), 16<<10)[:256<<10], 256<<10)
	require.NoError(t, err)
	s0 := v.snapshot()
	v.scribble(20)
	s1 := v.snapshot()

	export := func(src *blockdev.Mem, h Header, extents []Extent) []byte {
		var buf bytes.Buffer
		var seq func(func(Extent, error) bool)
		if extents != nil {
			seq = func(yield func(Extent, error) bool) {
				for _, x := range extents {
					if !yield(x, nil) {
						return
					}
				}
			}
		}
		_, err := Export(context.Background(), &buf, src, h, seq, nil)
		require.NoError(t, err)
		return buf.Bytes()
	}
	var changes []Extent
	for x, err := range changed(t, s0, s1) {
		require.NoError(t, err)
		changes = append(changes, x)
	}
	plainFull := export(s0, Header{To: ident(0)}, nil)
	zFull := export(s0, Header{To: ident(0), Flags: FlagZstd}, nil)
	zIncr := export(s1, Header{From: ident(0), To: ident(1), Flags: FlagZstd}, changes)
	require.Equal(t, uint16(Version1), binary.LittleEndian.Uint16(plainFull[8:]))
	require.Equal(t, uint16(Version2), binary.LittleEndian.Uint16(zFull[8:]))
	require.Less(t, len(zFull), len(plainFull)/2)

	h, tot, err := readStream(zFull)
	require.NoError(t, err)
	require.True(t, h.Compressed())
	_, plainTot, err := readStream(plainFull)
	require.NoError(t, err)
	require.Equal(t, plainTot, tot)

	target, err := blockdev.NewMem(1<<20, 4096)
	require.NoError(t, err)
	state := t.TempDir() + "/state"
	_, err = Apply(context.Background(), bytes.NewReader(zFull), target, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	requireSame(t, s0, target)
	_, err = Apply(context.Background(), bytes.NewReader(zIncr), target, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	requireSame(t, s1, target)
}

// Damage inside the compressed part is reported as corruption (by the
// decompressor or by a record checksum), and an error of the underlying
// reader passes through as it is.
func TestCompressedDamageAndReaderErrors(t *testing.T) {
	v := newVolume(t, 12, 256<<10)
	v.scribble(10)
	var buf bytes.Buffer
	_, err := Export(context.Background(), &buf, v.live, Header{To: ident(0), Flags: FlagZstd}, nil, nil)
	require.NoError(t, err)
	stream := buf.Bytes()
	hlen := int(binary.LittleEndian.Uint16(stream[10:]))
	for _, at := range []int{hlen, hlen + 7, (hlen + len(stream)) / 2, len(stream) - 3} {
		bad := append([]byte(nil), stream...)
		bad[at] ^= 0x5a
		_, _, err := readStream(bad)
		require.ErrorIs(t, err, ErrCorrupt, "flip at byte %d", at)
	}
	_, _, err = readStream(stream[:len(stream)-10])
	require.ErrorIs(t, err, ErrCorrupt)

	boom := errors.New("connection reset")
	r, err := NewReader(&failingReader{r: bytes.NewReader(stream), n: int64(hlen + 20), err: boom})
	require.NoError(t, err)
	defer r.Close()
	for err == nil {
		_, err = r.Next()
	}
	require.ErrorIs(t, err, boom)
	require.NotErrorIs(t, err, ErrCorrupt)
}

// The zero ApplyOptions are safe: an incremental stream with no state file
// to say where the target is gets refused; Force applies it.
func TestApplyIncrementalNeedsStateOrForce(t *testing.T) {
	v := newVolume(t, 13, 256<<10)
	v.scribble(10)
	s0 := v.snapshot()
	v.scribble(10)
	s1 := v.snapshot()
	incr := exportIncr(t, s0, s1, 0, 1)
	target := s0.Clone()
	_, err := Apply(context.Background(), bytes.NewReader(incr), target, ApplyOptions{})
	require.ErrorIs(t, err, ErrMismatch)
	require.ErrorContains(t, err, "no state file")
	requireSame(t, s0, target)
	_, err = Apply(context.Background(), bytes.NewReader(incr), target, ApplyOptions{Force: true})
	require.NoError(t, err)
	requireSame(t, s1, target)
	// A full stream needs no state.
	blank, err := blockdev.NewMem(256<<10, 512)
	require.NoError(t, err)
	_, err = Apply(context.Background(), bytes.NewReader(exportFull(t, s1, 1)), blank, ApplyOptions{})
	require.NoError(t, err)
	requireSame(t, s1, blank)
}

// A compressed stream decompressing to more than the decoder's memory
// bound (one record plus the window) reads whole: the bound is on the
// window, not on the stream.
func TestCompressedStreamLargerThanDecoderMemory(t *testing.T) {
	const size = 24 << 20
	m, err := blockdev.NewMem(size, 4096)
	require.NoError(t, err)
	p := bytes.Repeat([]byte("blocksnap "), size/10+1)[:size]
	for i := 0; i < size; i += 4096 {
		p[i] = byte(i >> 12) // no block is zero
	}
	_, err = m.WriteAt(p, 0)
	require.NoError(t, err)
	var buf bytes.Buffer
	_, err = Export(context.Background(), &buf, m, Header{To: ident(0), Flags: FlagZstd}, nil, nil)
	require.NoError(t, err)
	require.Less(t, buf.Len(), size/20)
	_, tot, err := readStream(buf.Bytes())
	require.NoError(t, err)
	require.Equal(t, int64(size), tot.DataBytes)
}

// failingWriter fails every write after the first n bytes.
type failingWriter struct{ n int }

func (f *failingWriter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		k := f.n
		f.n = 0
		return k, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

// A compressed export onto a writer that fails returns its error, at any
// point of the stream, and releases the compressor.
func TestCompressedExportWriterFails(t *testing.T) {
	v := newVolume(t, 14, 1<<20)
	v.scribble(30)
	for _, n := range []int{0, 10, 100, 5000, 60000} {
		_, err := Export(context.Background(), &failingWriter{n: n}, v.live, Header{To: ident(0), Flags: FlagZstd}, nil, nil)
		require.ErrorContains(t, err, "disk full", "failing after %d bytes", n)
	}
}
