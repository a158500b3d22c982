package blockdev_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// sparseImage fills m with random extents of data, of zeros written as
// data, and holes.
func sparseImage(t *testing.T, rng *rand.Rand, m *blockdev.Mem) {
	t.Helper()
	bs := m.BlockSize()
	blocks := int(m.Size()) / bs
	for range 40 {
		n := 1 + rng.IntN(64)
		off := int64(rng.IntN(blocks-n)) * int64(bs)
		p := make([]byte, n*bs)
		if rng.IntN(3) > 0 {
			for i := range p {
				p[i] = byte(rng.IntN(256))
			}
		}
		_, err := m.WriteAt(p, off)
		require.NoError(t, err)
	}
}

func TestCopySparse(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 2))
	for _, bs := range []int{512, 4096} {
		src, err := blockdev.NewMem(4<<20, bs)
		require.NoError(t, err)
		sparseImage(t, rng, src)
		// A dirty destination: Copy must zero what src holds as holes.
		dst, err := blockdev.NewMem(4<<20, 4096)
		require.NoError(t, err)
		_, err = dst.WriteAt(bytes.Repeat([]byte{0xee}, 4<<20), 0)
		require.NoError(t, err)
		var last, total int64
		require.NoError(t, blockdev.Copy(context.Background(), dst, src, func(done, tot int64) {
			require.GreaterOrEqual(t, done, last)
			last, total = done, tot
		}))
		require.Equal(t, src.Size(), last)
		require.Equal(t, src.Size(), total)
		require.Equal(t, blockdevtest.ReadAll(t, src), blockdevtest.ReadAll(t, dst))
		// Zero blocks and holes were not written: dst is as sparse as the
		// data in src (Mem pages are 4 KiB, so compare whole pages).
		require.LessOrEqual(t, dst.Allocated(), src.Allocated())
		eq, off, err := blockdev.Equal(context.Background(), src, dst)
		require.NoError(t, err)
		require.True(t, eq)
		require.Equal(t, int64(-1), off)
	}
}

// noMapper hides a device's AllocationMapper and Discard, so that Copy
// must read everything and zero by writing.
type noMapper struct{ blockdev.Device }

func (noMapper) Discard(off, n int64) error { return blockdev.ErrNotSupported }

func TestCopyWithoutMapperOrDiscard(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 3))
	src, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	sparseImage(t, rng, src)
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	_, err = m.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0)
	require.NoError(t, err)
	require.NoError(t, blockdev.Copy(context.Background(), noMapper{m}, noMapper{src}, nil))
	require.Equal(t, blockdevtest.ReadAll(t, src), blockdevtest.ReadAll(t, m))
}

func TestCopyErrors(t *testing.T) {
	ctx := context.Background()
	src, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	_, err = src.WriteAt(bytes.Repeat([]byte{7}, 4096), 8192)
	require.NoError(t, err)
	small, err := blockdev.NewMem(512<<10, 512)
	require.NoError(t, err)
	require.ErrorIs(t, blockdev.Copy(ctx, small, src, nil), blockdev.ErrOutOfRange)

	dst, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	require.ErrorIs(t, blockdev.Copy(ctx, blockdev.ReadOnly(dst), src, nil), blockdev.ErrReadOnly)

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	require.ErrorIs(t, blockdev.Copy(cctx, dst, src, nil), context.Canceled)

	odd, err := blockdev.NewMem(512*3, 512)
	require.NoError(t, err)
	big, err := blockdev.NewMem(1<<20, 4096)
	require.NoError(t, err)
	require.ErrorIs(t, blockdev.Copy(ctx, big, odd, nil), blockdev.ErrMisaligned)
	none := func(int64, []byte, bool) error { return nil }
	require.ErrorIs(t, blockdev.ScanRuns(ctx, src, 0, 4096, make([]byte, 1000), 512, none), blockdev.ErrMisaligned)
	require.ErrorIs(t, blockdev.ScanRuns(ctx, src, 0, 4096, make([]byte, 256), 512, none), blockdev.ErrMisaligned)

	// ScanRuns: runs alternate, never span pieces, and cover the range.
	var runs []blockdev.Extent
	require.NoError(t, blockdev.ScanRuns(ctx, src, 0, 16384, make([]byte, 10240), 512, func(off int64, p []byte, zero bool) error {
		runs = append(runs, blockdev.Extent{Off: off, Len: int64(len(p)), Zero: zero})
		return nil
	}))
	require.Equal(t, []blockdev.Extent{{Off: 0, Len: 8192, Zero: true}, {Off: 8192, Len: 2048}, {Off: 10240, Len: 2048},
		{Off: 12288, Len: 4096, Zero: true}}, runs)
}

func TestEqual(t *testing.T) {
	ctx := context.Background()
	a, err := blockdev.NewMem(4<<20, 512)
	require.NoError(t, err)
	b, err := blockdev.NewMem(4<<20, 4096)
	require.NoError(t, err)
	eq, off, err := blockdev.Equal(ctx, a, b)
	require.NoError(t, err)
	require.True(t, eq)
	require.Equal(t, int64(-1), off)

	// Data written as zeros equals a hole.
	_, err = a.WriteAt(make([]byte, 8192), 1<<20)
	require.NoError(t, err)
	eq, _, err = blockdev.Equal(ctx, a, b)
	require.NoError(t, err)
	require.True(t, eq)

	p := make([]byte, 512)
	p[100] = 1
	_, err = a.WriteAt(p, 3<<20+512)
	require.NoError(t, err)
	eq, off, err = blockdev.Equal(ctx, a, b)
	require.NoError(t, err)
	require.False(t, eq)
	require.Equal(t, int64(3<<20+512+100), off)

	c, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	eq, off, err = blockdev.Equal(ctx, c, b)
	require.NoError(t, err)
	require.False(t, eq)
	require.Equal(t, int64(2<<20), off)
}

// chunky yields a stream in reads of random small sizes, as a network
// connection does.
type chunky struct {
	r   *bytes.Reader
	rng *rand.Rand
}

func (c *chunky) Read(p []byte) (int, error) {
	return c.r.Read(p[:min(len(p), 1+c.rng.IntN(3000))])
}

func TestWriterUnalignedStream(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 4))
	for range 20 {
		dev, err := blockdev.NewMem(3<<20, []int{512, 4096}[rng.IntN(2)])
		require.NoError(t, err)
		model := make([]byte, dev.Size())
		for i := range model {
			model[i] = byte(i % 251)
		}
		_, err = dev.WriteAt(model, 0)
		require.NoError(t, err)
		off := rng.Int64N(dev.Size() / 2)
		data := make([]byte, rng.Int64N(dev.Size()-off))
		for i := range data {
			data[i] = byte(rng.IntN(256))
		}
		copy(model[off:], data)
		w := blockdev.NewWriter(dev, off)
		var n int64
		if rng.IntN(2) == 0 {
			n, err = io.Copy(w, &chunky{r: bytes.NewReader(data), rng: rng}) // ReadFrom
		} else {
			n, err = io.Copy(struct{ io.Writer }{w}, &chunky{r: bytes.NewReader(data), rng: rng}) // Write
		}
		require.NoError(t, err)
		require.Equal(t, int64(len(data)), n)
		require.Equal(t, off+n, w.Offset())
		require.NoError(t, w.Close())
		require.Equal(t, model, blockdevtest.ReadAll(t, dev), "stream of %d bytes at %d", len(data), off)
	}
}

func TestWriterWriteAtAndBounds(t *testing.T) {
	dev, err := blockdev.NewMem(64<<10, 4096)
	require.NoError(t, err)
	model := make([]byte, dev.Size())
	w := blockdev.NewWriter(dev, 100)
	_, err = w.Write([]byte("hello"))
	require.NoError(t, err)
	copy(model[100:], "hello")
	_, err = w.WriteAt([]byte("across a block edge"), 4090)
	require.NoError(t, err)
	copy(model[4090:], "across a block edge")
	_, err = w.Write([]byte(", world"))
	require.NoError(t, err)
	copy(model[105:], ", world")
	require.NoError(t, w.Flush())
	require.Equal(t, model, blockdevtest.ReadAll(t, dev))

	// Past the end: refused, typed.
	w = blockdev.NewWriter(dev, dev.Size()-3)
	_, err = w.Write([]byte("four"))
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	n, err := w.ReadFrom(bytes.NewReader([]byte("four")))
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	require.Equal(t, int64(3), n)
	require.NoError(t, w.Close())
	_, err = w.Write([]byte("x"))
	require.ErrorIs(t, err, blockdev.ErrClosed)

	// A read-only device: the error surfaces at Flush.
	w = blockdev.NewWriter(blockdev.ReadOnly(dev), 0)
	_, err = w.Write([]byte("x"))
	require.NoError(t, err)
	require.ErrorIs(t, w.Close(), blockdev.ErrReadOnly)
	require.True(t, errors.Is(blockdev.NewWriter(dev, -1).Flush(), blockdev.ErrOutOfRange))
}

func TestCheckReport(t *testing.T) {
	var r blockdev.CheckReport
	require.True(t, r.OK())
	require.NoError(t, r.Err(blockdev.ErrIO))
	for i := range 8 {
		r.Addf("problem %d", i)
	}
	err := r.Err(blockdev.ErrIO)
	require.ErrorIs(t, err, blockdev.ErrIO)
	var ce *blockdev.CheckError
	require.ErrorAs(t, err, &ce)
	require.Len(t, ce.Problems, 8)
	require.Contains(t, err.Error(), "8 problems: problem 0; problem 1")
	require.Contains(t, err.Error(), "and 3 more")
}

func TestIsZero(t *testing.T) {
	for n := range 100 {
		p := make([]byte, n)
		require.True(t, blockdev.IsZero(p))
		for i := range n {
			p[i] = 1
			require.False(t, blockdev.IsZero(p), "len %d, byte %d", n, i)
			p[i] = 0
		}
	}
}

// io.Copy from a TCP connection into a file device opened with O_DIRECT
// (which needs aligned offsets, lengths and memory) through a Writer.
func TestWriterFromNetworkOntoDirectFile(t *testing.T) {
	dev := newFile(t, blockdev.FileOptions{Direct: true})
	data := make([]byte, 3<<20+777)
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 5))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	sent := make(chan error, 1)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			_, err = c.Write(data)
			c.Close()
		}
		sent <- err
	}()
	conn, err := ln.Accept()
	require.NoError(t, err)
	defer conn.Close()
	w := blockdev.NewWriter(dev, 4096+100)
	n, err := io.Copy(w, conn)
	require.NoError(t, err)
	require.NoError(t, <-sent)
	require.Equal(t, int64(len(data)), n)
	require.NoError(t, w.Close())
	got := blockdevtest.ReadAll(t, dev)
	require.Equal(t, data, got[4096+100:4096+100+len(data)])
	require.True(t, blockdev.IsZero(got[:4096+100]))
}
