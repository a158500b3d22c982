package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// fixture is a small valid journal image: some records before a
// checkpoint, some after, and where its log tail lies.
type fixture struct {
	img      []byte
	bs       int
	records  [][]byte // replayed after the checkpoint, in order
	firstSeq uint64
	tail     int64 // apos
	head     int64
	logOff   int64
	logSize  int64
	sb       []byte // current superblock block
	batch    []byte // image of the last batch written
	batchAt  int64  // its apos
}

// With small, the records are a few bytes each, so the last batch (the
// record fuzzers' seed) is a few dozen bytes: Go's engine minimises each new
// input with a number of tries that grows with the square of its length,
// and with the kilobyte batch it spent whole runs minimising.
func buildFixture(tb testing.TB, small bool) *fixture {
	tb.Helper()
	ctx := context.Background()
	const bs = 512
	dev := blockdevtest.NewMem(tb, 2*bs+2*4096+(32<<10), bs)
	j, err := Format(dev, Options{CheckpointSize: 4096})
	require.NoError(tb, err)
	fx := &fixture{bs: bs}
	for i := 1; i <= 30; i++ {
		p := []byte(fmt.Sprintf("record %d %s", i, bytes.Repeat([]byte{byte(i)}, i*13)))
		if small {
			p = []byte{byte(i)}
		}
		_, err := j.Append(ctx, p)
		require.NoError(tb, err)
		if i > 8 {
			fx.records = append(fx.records, p)
		}
		if i%4 == 0 || i == 30 {
			require.NoError(tb, j.Commit(ctx))
		}
		if i == 8 {
			require.NoError(tb, j.Checkpoint(ctx, 8, ckptWriter(nil)))
		}
	}
	fx.firstSeq = 9
	j.mu.Lock()
	fx.tail, fx.head = j.st.tail, j.st.head
	last := j.st.spans.at(j.st.spans.n - 1)
	j.mu.Unlock()
	fx.logOff, fx.logSize = j.logOff, j.logSize
	require.NoError(tb, j.Close())
	fx.img = make([]byte, dev.Size())
	_, err = dev.ReadAt(fx.img, 0)
	require.NoError(tb, err)
	sb, err := readSuperblock(dev)
	require.NoError(tb, err)
	fx.sb = append([]byte(nil), fx.img[sb.location:sb.location+bs]...)
	fx.batchAt = last.apos
	fx.batch = make([]byte, last.size)
	for i := range fx.batch {
		fx.batch[i] = fx.img[fx.logOff+(last.apos+int64(i))%fx.logSize]
	}
	return fx
}

func (fx *fixture) device(tb testing.TB) *blockdev.Mem {
	m := blockdevtest.NewMem(tb, int64(len(fx.img)), fx.bs)
	_, err := m.WriteAt(fx.img, 0)
	require.NoError(tb, err)
	return m
}

func FuzzSuperblock(f *testing.F) {
	fx := buildFixture(f, false)
	f.Add(fx.sb)
	f.Add(fx.sb[:sbSize])
	f.Add(fx.sb[:sbSize-1])
	f.Add(make([]byte, 512))
	for _, i := range []int{8, 12, 16, 32, 56, 72, 88, 96, 112} {
		b := bytes.Clone(fx.sb)
		b[i] ^= 0x40
		le.PutUint32(b[128:], crc(saltSuperblock, b[:128])) // re-sealed: semantic checks only
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, loc := range []int64{0, 512} {
			sb, err := decodeSuperblock(b, loc)
			if err != nil {
				require.ErrorIs(t, err, ErrCorrupt)
				require.Contains(t, err.Error(), fmt.Sprintf("superblock at %d", loc))
				continue
			}
			out := make([]byte, sbSize)
			sb.encode(out)
			require.Equal(t, b[:sbSize], out, "decode/encode round trip")
		}
	})
}

func FuzzRecord(f *testing.F) {
	fx := buildFixture(f, true)
	f.Add(fx.batch, uint64(fx.batchAt))
	f.Add(fx.batch[:batchHdrSize], uint64(fx.batchAt))
	f.Add(fx.batch[:len(fx.batch)/2], uint64(fx.batchAt))
	b := bytes.Clone(fx.batch)
	le.PutUint32(b[40:], 1<<31) // huge length, re-sealed
	le.PutUint32(b[44:], crc(saltBatch, b[:44]))
	f.Add(b, uint64(0))
	f.Fuzz(func(t *testing.T, b []byte, apos uint64) {
		total := 0
		h, err := decodeBatch(b, int64(apos&(1<<40-1)), func(seq uint64, payload []byte) error {
			total += recHdrSize + len(payload)
			return nil
		})
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			require.Contains(t, err.Error(), "batch at log")
			require.Zero(t, total, "no record delivered from a bad batch")
			return
		}
		require.Equal(t, int(h.length), total)
		require.LessOrEqual(t, batchHdrSize+total, len(b))
	})
}

// FuzzReplay writes fuzzed bytes over the log after a valid journal's tail:
// replay returns exactly the valid records, then whatever the fuzzed bytes
// hold only if they form a valid successor batch.
func FuzzReplay(f *testing.F) {
	fx := buildFixture(f, true)
	// Seeds: the last batch again (stale: wrong position), garbage, zeros,
	// a torn copy of it.
	f.Add(fx.batch)
	// Garbage and zeros stay short: Go's engine minimises each new input
	// with a number of tries that grows with the square of its length.
	f.Add(bytes.Repeat([]byte{0xa5}, 64))
	f.Add(make([]byte, 16))
	torn := bytes.Clone(fx.batch)
	if len(torn) > 512 {
		clear(torn[512:])
	}
	f.Add(torn)
	// One device for every input, the fixture written back over it each
	// time: setup stays out of the loop.
	dev := fx.device(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		room := fx.head + fx.logSize - fx.tail
		if int64(len(data)) > room {
			data = data[:room]
		}
		_, err := dev.WriteAt(fx.img, 0)
		require.NoError(t, err)
		buf := make([]byte, roundUp(int64(len(data)), int64(fx.bs)))
		copy(buf, data)
		j := &Journal{dev: dev, bs: int64(fx.bs), logOff: fx.logOff, logSize: fx.logSize}
		require.NoError(t, j.logIO(buf, fx.tail, true))
		r := &recorder{}
		jr, err := Open(dev, Options{}, r)
		require.NoError(t, err)
		require.NoError(t, jr.Close())
		require.GreaterOrEqual(t, len(r.records), len(fx.records))
		for i, rec := range fx.records {
			require.Equal(t, fx.firstSeq+uint64(i), r.seqs[i])
			require.Equal(t, rec, r.records[i])
		}
		if len(r.records) > len(fx.records) {
			// Only a batch that claims exactly this place, this journal and
			// the next sequence, with good checksums, may extend the log.
			h, err := decodeBatch(buf, fx.tail, func(uint64, []byte) error { return nil })
			require.NoError(t, err)
			require.Equal(t, uint64(fx.tail), h.apos)
			require.Equal(t, fx.firstSeq+uint64(len(fx.records)), h.firstSeq)
		}
	})
}

func TestFuzzHelpersRejectGarbageWithLocation(t *testing.T) {
	_, err := decodeBatch(make([]byte, 10), 4096, nil)
	require.True(t, errors.Is(err, ErrCorrupt))
	require.Contains(t, err.Error(), "batch at log 4096")
}
