package journal

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// flipFixture is a journal image whose log has lapped several times, with a
// checkpoint and committed records after it, and a model of its records.
type flipFixture struct {
	img   []byte
	m     *model
	last  uint64
	sbLoc []int64
	batch span // a committed batch in the middle of the replay chain
	next  span // the batch after it
	j     *Journal
}

func buildFlipFixture(t *testing.T) *flipFixture {
	ctx := context.Background()
	const bs = 512
	dev := blockdevtest.NewMem(t, 2*bs+2*(8<<10)+(16<<10), bs)
	j, err := Format(dev, Options{CheckpointSize: 8 << 10})
	require.NoError(t, err)
	m := newModel()
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		select {
		case <-j.NeedCheckpoint():
			upTo := j.LastSeq()
			require.NoError(t, j.Checkpoint(ctx, upTo, m.captureFor(upTo)))
			m.checkpointReturned(upTo)
		default:
		}
		p := testPayload(rng, fmt.Sprint(i, ";"))
		p = p[:min(len(p), 200)]
		seq, err := j.Append(ctx, p)
		require.NoError(t, err)
		m.appended(seq, p)
		require.NoError(t, j.Commit(ctx))
	}
	fx := &flipFixture{m: m, last: j.LastSeq(), sbLoc: []int64{0, bs}, j: j}
	require.Greater(t, j.Stats().Bytes, uint64(3*j.logSize), "the log lapped")
	j.mu.Lock()
	require.GreaterOrEqual(t, j.st.spans.n, 3)
	fx.batch, fx.next = j.st.spans.at(1), j.st.spans.at(2)
	j.mu.Unlock()
	require.NoError(t, j.Close())
	fx.img = make([]byte, dev.Size())
	_, err = dev.ReadAt(fx.img, 0)
	require.NoError(t, err)
	return fx
}

// open opens a copy of the image with byte off's bit flipped.
func (fx *flipFixture) open(t *testing.T, off int64, bit uint) (*checker, error) {
	img := append([]byte(nil), fx.img...)
	img[off] ^= 1 << bit
	dev := blockdevtest.NewMem(t, int64(len(img)), 512)
	_, err := dev.WriteAt(img, 0)
	require.NoError(t, err)
	c := &checker{}
	j, err := Open(dev, Options{}, c)
	if err != nil {
		return c, err
	}
	return c, j.Close()
}

// prefix checks that c recovered the model's state up to some record: the
// newest checkpoint, then records in order, each exactly as appended, and
// returns the last record recovered.
func (fx *flipFixture) prefix(c *checker) (uint64, error) {
	fx.m.mu.Lock()
	defer fx.m.mu.Unlock()
	if !c.loaded || c.upTo != fx.m.ckDone {
		return 0, fmt.Errorf("checkpoint loaded=%v upTo %d, want %d", c.loaded, c.upTo, fx.m.ckDone)
	}
	if h, _ := fx.m.hashLocked(c.upTo); h != c.hash {
		return 0, fmt.Errorf("checkpoint state differs")
	}
	for i, seq := range c.seqs {
		if seq != c.upTo+uint64(i)+1 || string(fx.m.payload[seq]) != string(c.recs[i]) {
			return 0, fmt.Errorf("record %d (seq %d) differs", i, seq)
		}
	}
	return c.upTo + uint64(len(c.seqs)), nil
}

// flipStride is 1 (every byte's every bit), or a sample under the race
// detector, where these single-goroutine tests gain nothing.
func flipStride() int64 {
	if raceEnabled {
		return 7
	}
	return 1
}

// TestBitFlipSuperblock flips every bit of each superblock copy: the flip is
// detected and the other copy, identical, takes over, so the recovered
// state is unchanged.
func TestBitFlipSuperblock(t *testing.T) {
	fx := buildFlipFixture(t)
	for _, loc := range fx.sbLoc {
		for off := loc; off < loc+512; off += flipStride() {
			for bit := range uint(8) {
				c, err := fx.open(t, off, bit)
				require.NoError(t, err, "flip byte %d bit %d", off, bit)
				last, err := fx.prefix(c)
				require.NoError(t, err, "flip byte %d bit %d", off, bit)
				require.Equal(t, fx.last, last, "flip byte %d bit %d", off, bit)
			}
		}
	}
}

// TestBitFlipRecordBlock flips every bit of the first block of a committed
// batch (its header and records): the damaged batch is rejected, so replay
// stops before it, with every record it does return intact; a flip in the
// batch's padding is harmless.
func TestBitFlipRecordBlock(t *testing.T) {
	fx := buildFlipFixture(t)
	j := fx.j
	blk := j.logOff + fx.batch.apos%j.logSize
	before := fx.batch.firstSeq - 1
	cut, whole := 0, 0
	for off := blk; off < blk+j.bs; off += flipStride() {
		for bit := range uint(8) {
			c, err := fx.open(t, off, bit)
			require.NoError(t, err, "flip byte %d bit %d", off, bit)
			last, err := fx.prefix(c)
			require.NoError(t, err, "flip byte %d bit %d", off, bit)
			switch last {
			case before:
				cut++
			case fx.last:
				whole++
			default:
				t.Fatalf("flip byte %d bit %d: recovered up to %d, want %d (cut) or %d (harmless)", off, bit, last, before, fx.last)
			}
		}
	}
	require.Positive(t, cut)
	t.Logf("%d flips cut the log at the damaged batch, %d were in padding", cut, whole)
}
