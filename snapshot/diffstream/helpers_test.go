package diffstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"iter"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

const testChunk = 4096

// volume is a live volume and its frozen snapshots, the model the tests
// export from.
type volume struct {
	t     *testing.T
	rng   *rand.Rand
	live  *blockdev.Mem
	snaps []*blockdev.Mem
}

func newVolume(t *testing.T, seed uint64, size int64) *volume {
	t.Helper()
	m, err := blockdev.NewMem(size, 512)
	require.NoError(t, err)
	return &volume{t: t, rng: rand.New(rand.NewPCG(seed, 1)), live: m}
}

// scribble writes n random extents (some of zeros) and discards one range.
func (v *volume) scribble(n int) {
	size := v.live.Size()
	for range n {
		blocks := 1 + v.rng.IntN(64)
		p := make([]byte, blocks*512)
		if v.rng.IntN(4) > 0 {
			for i := range p {
				p[i] = byte(v.rng.IntN(256))
			}
		}
		off := int64(v.rng.IntN(int(size/512)-blocks)) * 512
		_, err := v.live.WriteAt(p, off)
		require.NoError(v.t, err)
	}
	off := int64(v.rng.IntN(int(size/4096)-4)) * 4096
	require.NoError(v.t, v.live.Discard(off, 4096*int64(1+v.rng.IntN(3))))
}

func (v *volume) snapshot() *blockdev.Mem {
	s := v.live.Clone()
	v.snaps = append(v.snaps, s)
	return s
}

// changed lists the chunks that differ between two images, merged into
// extents, as a snapshot store's diff would.
func changed(t *testing.T, a, b *blockdev.Mem) iter.Seq2[Extent, error] {
	var out []Extent
	pa, pb := make([]byte, testChunk), make([]byte, testChunk)
	for off := int64(0); off < a.Size(); off += testChunk {
		_, err := a.ReadAt(pa, off)
		require.NoError(t, err)
		_, err = b.ReadAt(pb, off)
		require.NoError(t, err)
		if bytes.Equal(pa, pb) {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == off {
			out[n-1].Len += testChunk
		} else {
			out = append(out, Extent{Off: off, Len: testChunk})
		}
	}
	return func(yield func(Extent, error) bool) {
		for _, x := range out {
			if !yield(x, nil) {
				return
			}
		}
	}
}

func ident(i int) Identity {
	return Identity{ID: string(rune('a'+i)) + "-id", Name: "snap" + string(rune('0'+i))}
}

// exportFull returns a full stream of src as snapshot i.
func exportFull(t *testing.T, src blockdev.Device, i int) []byte {
	t.Helper()
	var buf bytes.Buffer
	_, err := Export(context.Background(), &buf, src, Header{ChunkSize: testChunk, To: ident(i)}, nil, nil)
	require.NoError(t, err)
	return buf.Bytes()
}

// exportIncr returns the stream from snapshot i (image a) to j (image b).
func exportIncr(t *testing.T, a, b *blockdev.Mem, i, j int) []byte {
	t.Helper()
	var buf bytes.Buffer
	h := Header{ChunkSize: testChunk, From: ident(i), To: ident(j)}
	_, err := Export(context.Background(), &buf, b, h, changed(t, a, b), nil)
	require.NoError(t, err)
	return buf.Bytes()
}

func image(t *testing.T, d blockdev.Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	_, err := d.ReadAt(p, 0)
	require.NoError(t, err)
	return p
}

func requireSame(t *testing.T, want, got blockdev.Device) {
	t.Helper()
	a, b := image(t, want), image(t, got)
	if !bytes.Equal(a, b) {
		for i := range a {
			if a[i] != b[i] {
				t.Fatalf("images differ first at byte %d: want %#x, got %#x", i, a[i], b[i])
			}
		}
	}
}

// failingReader returns err after n bytes.
type failingReader struct {
	r   *bytes.Reader
	n   int64
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, f.err
	}
	if int64(len(p)) > f.n {
		p = p[:f.n]
	}
	k, err := f.r.Read(p)
	f.n -= int64(k)
	return k, err
}

// readAll decodes a whole stream and returns its records' totals.
func readStream(stream []byte) (Header, Totals, error) {
	r, err := NewReader(bytes.NewReader(stream))
	if err != nil {
		return Header{}, Totals{}, err
	}
	for {
		_, err := r.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return r.Header(), r.Totals(), nil
			}
			return r.Header(), r.Totals(), err
		}
	}
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o644) }
