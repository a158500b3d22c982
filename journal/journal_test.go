package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// recorder is a Replayer that keeps what it is given.
type recorder struct {
	ckpt    []byte // nil: LoadCheckpoint not called
	loads   int
	seqs    []uint64
	records [][]byte
}

func (r *recorder) LoadCheckpoint(rd io.Reader) error {
	r.loads++
	b, err := io.ReadAll(rd)
	if err != nil {
		return err
	}
	r.ckpt = append([]byte{}, b...)
	return nil
}

func (r *recorder) Replay(seq uint64, payload []byte) error {
	r.seqs = append(r.seqs, seq)
	r.records = append(r.records, append([]byte{}, payload...))
	return nil
}

func recordPayload(i int) []byte {
	n := (i * 37) % 300
	if i%17 == 0 {
		n = 5000 + i // spans blocks
	}
	p := make([]byte, n)
	for k := range p {
		p[k] = byte(i + k*7)
	}
	return p
}

func reopen(t *testing.T, dev blockdev.Device, opts Options) (*Journal, *recorder) {
	t.Helper()
	r := &recorder{}
	j, err := Open(dev, opts, r)
	require.NoError(t, err)
	return j, r
}

func TestFormatOpenEmpty(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dev := blockdevtest.NewMem(t, 1<<20, bs)
			j, err := Format(dev, Options{})
			require.NoError(t, err)
			require.Equal(t, uint64(0), j.LastSeq())
			require.NoError(t, j.Commit(context.Background()))
			require.Equal(t, uint64(0), j.Stats().Flushes, "empty commit does no I/O")
			require.NoError(t, j.Close())
			require.ErrorIs(t, j.Close(), ErrClosed)

			j, r := reopen(t, dev, Options{})
			require.Zero(t, r.loads)
			require.Empty(t, r.seqs)
			require.NoError(t, j.Close())
		})
	}
}

func TestFormatTooSmall(t *testing.T) {
	_, err := Format(blockdevtest.NewMem(t, 8*512, 512), Options{})
	require.ErrorIs(t, err, ErrNoSpace)
	_, err = Format(blockdevtest.NewMem(t, 1<<20, 512), Options{CheckpointSize: 1 << 20})
	require.ErrorIs(t, err, ErrNoSpace)
}

func TestOpenGarbage(t *testing.T) {
	dev := blockdevtest.NewMem(t, 1<<20, 512)
	_, err := Open(dev, Options{}, &recorder{})
	require.ErrorIs(t, err, ErrCorrupt)
	require.Contains(t, err.Error(), "superblock at 0")
}

func TestAppendCommitReplay(t *testing.T) {
	ctx := context.Background()
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dev := blockdevtest.NewMem(t, 4<<20, bs)
			j, err := Format(dev, Options{})
			require.NoError(t, err)
			const n = 200
			for i := 1; i <= n; i++ {
				seq, err := j.Append(ctx, recordPayload(i))
				require.NoError(t, err)
				require.Equal(t, uint64(i), seq)
				if i%7 == 0 {
					require.NoError(t, j.Commit(ctx))
				}
			}
			require.NoError(t, j.Commit(ctx))
			st := j.Stats()
			require.Equal(t, uint64(n), st.Records)
			require.Equal(t, uint64(n/7+1), st.Flushes)
			require.NoError(t, j.Close())

			for round := range 3 {
				j, r := reopen(t, dev, Options{})
				require.Len(t, r.seqs, n, "round %d", round)
				for i, seq := range r.seqs {
					require.Equal(t, uint64(i+1), seq)
					require.Equal(t, recordPayload(i+1), r.records[i])
				}
				require.Equal(t, uint64(n), j.LastSeq())
				require.NoError(t, j.Close())
			}
		})
	}
}

func TestUncommittedLostCleanly(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 1<<20, 4096)
	j, err := Format(dev, Options{})
	require.NoError(t, err)
	_, err = j.Append(ctx, []byte("one"))
	require.NoError(t, err)
	require.NoError(t, j.Commit(ctx))
	_, err = j.Append(ctx, []byte("two"))
	require.NoError(t, err)
	require.NoError(t, j.Close())
	require.ErrorIs(t, j.Commit(ctx), ErrClosed)
	_, err = j.Append(ctx, []byte("x"))
	require.ErrorIs(t, err, ErrClosed)

	j, r := reopen(t, dev, Options{})
	require.Equal(t, []uint64{1}, r.seqs)
	seq, err := j.Append(ctx, []byte("three"))
	require.NoError(t, err)
	require.Equal(t, uint64(2), seq)
	require.NoError(t, j.Commit(ctx))
	require.NoError(t, j.Close())
	_, r = reopen(t, dev, Options{})
	require.Equal(t, [][]byte{[]byte("one"), []byte("three")}, r.records)
}

func TestRecordLimits(t *testing.T) {
	ctx := context.Background()
	j, err := Format(blockdevtest.NewMem(t, 64*4096, 4096), Options{})
	require.NoError(t, err)
	_, err = j.Append(ctx, make([]byte, MaxRecord+1))
	require.ErrorIs(t, err, ErrTooLarge)
	_, err = j.Append(ctx, make([]byte, 200<<10)) // larger than the log
	require.ErrorIs(t, err, ErrNoSpace)
	seq, err := j.Append(ctx, nil)
	require.NoError(t, err)
	require.Equal(t, uint64(1), seq)
	require.NoError(t, j.Close())
}

// ckptState is a test engine's state: the records it has seen.
func ckptWriter(records [][]byte) func(io.Writer) error {
	return func(w io.Writer) error {
		if _, err := fmt.Fprintf(w, "%d;", len(records)); err != nil {
			return err
		}
		for _, r := range records {
			if _, err := fmt.Fprintf(w, "%d:", len(r)); err != nil {
				return err
			}
			if _, err := w.Write(r); err != nil {
				return err
			}
		}
		return nil
	}
}

func encodeState(records [][]byte) []byte {
	var b bytes.Buffer
	_ = ckptWriter(records)(&b)
	return b.Bytes()
}

func TestCheckpointReclaimsLog(t *testing.T) {
	ctx := context.Background()
	// A 64 KiB log: thousands of records lap it many times.
	dev := blockdevtest.NewMem(t, 2*512+2*(256<<10)+(64<<10), 512)
	j, err := Format(dev, Options{CheckpointSize: 256 << 10})
	require.NoError(t, err)
	var all [][]byte
	ckpts := 0
	for i := 1; i <= 3000; i++ {
		p := recordPayload(i)[:min(len(recordPayload(i)), 100)]
		_, err := j.Append(ctx, p)
		require.NoError(t, err)
		all = append(all, p)
		require.NoError(t, j.Commit(ctx))
		select {
		case <-j.NeedCheckpoint():
			require.NoError(t, j.Checkpoint(ctx, j.LastSeq(), ckptWriter(all)))
			ckpts++
			require.Less(t, j.Stats().Fill, 0.1)
		default:
		}
	}
	require.Greater(t, ckpts, 10)
	st := j.Stats()
	require.Equal(t, uint64(ckpts), st.Checkpoints)
	require.Greater(t, int64(st.Bytes), int64(5*(64<<10)), "log lapped several times")
	require.NoError(t, j.Close())

	j, r := reopen(t, dev, Options{})
	require.Equal(t, 1, r.loads)
	// Checkpoint + replayed records == everything.
	var covered int
	_, err = fmt.Sscanf(string(r.ckpt), "%d;", &covered)
	require.NoError(t, err)
	require.LessOrEqual(t, covered, len(all))
	require.Equal(t, encodeState(all[:covered]), r.ckpt, "checkpoint is the state after its records")
	require.Equal(t, len(all)-covered, len(r.records))
	for i, rec := range r.records {
		require.Equal(t, uint64(covered+i+1), r.seqs[i])
		require.Equal(t, all[covered+i], rec)
	}
	require.NoError(t, j.Close())
}

func TestAppendBlocksWhenFull(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 2*512+2*(16<<10)+(16<<10), 512)
	j, err := Format(dev, Options{CheckpointSize: 16 << 10})
	require.NoError(t, err)
	p := make([]byte, 1000)
	var n int
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	for {
		_, err := j.Append(cctx, p)
		if err != nil {
			require.ErrorIs(t, err, context.Canceled)
			break
		}
		n++
		require.NoError(t, j.Commit(ctx))
	}
	require.Greater(t, n, 5)
	select {
	case <-j.NeedCheckpoint():
	default:
		t.Fatal("full log did not ask for a checkpoint")
	}
	// An Append blocked on the full log proceeds once a checkpoint frees it.
	done := make(chan error, 1)
	go func() {
		_, err := j.Append(ctx, p)
		done <- err
	}()
	require.NoError(t, j.Checkpoint(ctx, j.LastSeq(), func(w io.Writer) error { return nil }))
	require.NoError(t, <-done)
	require.NoError(t, j.Commit(ctx))
	require.NoError(t, j.Close())

	j, r := reopen(t, dev, Options{})
	require.Equal(t, []uint64{uint64(n + 1)}, r.seqs)
	require.Equal(t, 1, r.loads)
	require.Empty(t, r.ckpt)
	require.NoError(t, j.Close())
}

func TestCheckpointTooLarge(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 1<<20, 4096)
	j, err := Format(dev, Options{CheckpointSize: 8192})
	require.NoError(t, err)
	_, err = j.Append(ctx, []byte("a"))
	require.NoError(t, err)
	err = j.Checkpoint(ctx, 1, func(w io.Writer) error {
		_, err := w.Write(make([]byte, 8193))
		return err
	})
	require.ErrorIs(t, err, ErrNoSpace)
	require.Error(t, j.Checkpoint(ctx, 2, func(io.Writer) error { return nil }), "upTo past LastSeq")
	require.NoError(t, j.Checkpoint(ctx, 1, func(w io.Writer) error {
		_, err := w.Write(make([]byte, 8192))
		return err
	}))
	require.Error(t, j.Checkpoint(ctx, 0, func(io.Writer) error { return nil }), "upTo before the current checkpoint")
	require.NoError(t, j.Close())
	j, r := reopen(t, dev, Options{})
	require.Len(t, r.ckpt, 8192)
	require.Empty(t, r.seqs)
	require.Equal(t, uint64(1), j.LastSeq())
	require.NoError(t, j.Close())
}

func TestGroupCommit(t *testing.T) {
	ctx := context.Background()
	mem := blockdevtest.NewMem(t, 4<<20, 4096)
	j0, err := Format(mem, Options{})
	require.NoError(t, err)
	require.NoError(t, j0.Close())
	g := blockdevtest.NewFlushGate(mem)
	var pre sync.Mutex
	preCalls := 0
	j, err := Open(g, Options{PreCommit: func() error { pre.Lock(); preCalls++; pre.Unlock(); return nil }}, &recorder{})
	require.NoError(t, err)
	g.Arm()

	const followers = 15
	errs := make(chan error, followers+1)
	_, err = j.Append(ctx, []byte("leader"))
	require.NoError(t, err)
	go func() { errs <- j.Commit(ctx) }()
	<-g.Entered() // the leader is inside its Flush
	for i := range followers {
		_, err := j.Append(ctx, []byte(fmt.Sprint("follower ", i)))
		require.NoError(t, err)
		go func() { errs <- j.Commit(ctx) }()
	}
	// Wait until every follower is waiting on the leader's round.
	waitFor(t, func() bool {
		j.mu.Lock()
		defer j.mu.Unlock()
		return j.st.lastSeq == followers+1
	})
	g.Release()
	for range followers + 1 {
		require.NoError(t, <-errs)
	}
	st := j.Stats()
	require.Equal(t, uint64(followers+1), st.Records)
	require.Equal(t, uint64(followers+1), st.Commits)
	require.Equal(t, uint64(2), st.Flushes, "followers share one flush")
	require.Equal(t, 2, preCalls)
	require.NoError(t, j.Close())
	_, r := reopen(t, mem, Options{})
	require.Len(t, r.seqs, followers+1)
}

// waitFor polls cond until it holds (no timing assertion: the test's own
// deadline bounds it).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for !cond() {
		runtime.Gosched()
	}
}

func TestPreCommitError(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 1<<20, 4096)
	fail := errors.New("destination flush failed")
	var failing = true
	j, err := Format(dev, Options{PreCommit: func() error {
		if failing {
			return fail
		}
		return nil
	}})
	require.NoError(t, err)
	_, err = j.Append(ctx, []byte("a"))
	require.NoError(t, err)
	require.ErrorIs(t, j.Commit(ctx), fail)
	failing = false
	_, err = j.Append(ctx, []byte("b"))
	require.NoError(t, err)
	require.NoError(t, j.Commit(ctx))
	require.NoError(t, j.Close())
	_, r := reopen(t, dev, Options{})
	require.Equal(t, [][]byte{[]byte("a"), []byte("b")}, r.records)
}

func TestDeviceErrorIsSticky(t *testing.T) {
	ctx := context.Background()
	mem := blockdevtest.NewMem(t, 1<<20, 4096)
	f := blockdevtest.NewFaulty(mem)
	j, err := Format(f, Options{})
	require.NoError(t, err)
	f.FailNth(blockdevtest.OpFlush, 3, blockdev.ErrIO) // Format flushes twice
	_, err = j.Append(ctx, []byte("a"))
	require.NoError(t, err)
	require.ErrorIs(t, j.Commit(ctx), blockdev.ErrIO)
	_, err = j.Append(ctx, []byte("b"))
	require.ErrorIs(t, err, blockdev.ErrIO)
	require.ErrorIs(t, j.Commit(ctx), blockdev.ErrIO)
	require.NoError(t, j.Close())
}

// TestStaleBatchFromEarlierEpochIsCut builds the case the epoch exists for:
// one commit round writes batches X and Y, a crash tears X and keeps Y, the
// next life rewrites X's place with a batch of exactly X's size and count,
// so that Y's header sits where the log continues and its sequence numbers
// follow on. Y was written before the crash that the last Open cut off, so
// it must not be replayed.
func TestStaleBatchFromEarlierEpochIsCut(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 1<<20, 512)
	j, err := Format(dev, Options{})
	require.NoError(t, err)
	j.batchTarget = 250
	rec := func(tag string) []byte { return append([]byte(tag), make([]byte, 90)...) }
	_, err = j.Append(ctx, rec("base"))
	require.NoError(t, err)
	require.NoError(t, j.Commit(ctx))
	for _, tag := range []string{"x1", "x2", "y1", "y2"} {
		_, err = j.Append(ctx, rec(tag))
		require.NoError(t, err)
	}
	require.NoError(t, j.Commit(ctx))
	j.mu.Lock()
	require.Equal(t, 3, j.st.spans.n, "base, X and Y")
	x, y := j.st.spans.at(1), j.st.spans.at(2)
	j.mu.Unlock()
	require.Equal(t, uint32(2), x.count)
	require.Equal(t, x.apos+x.size, y.apos)
	require.NoError(t, j.Close())

	// The crash tore X.
	_, err = dev.WriteAt(make([]byte, 512), j.logOff+x.apos)
	require.NoError(t, err)
	j, r := reopen(t, dev, Options{})
	require.Equal(t, []uint64{1}, r.seqs)
	j.batchTarget = 250
	for _, tag := range []string{"z1", "z2"} {
		_, err = j.Append(ctx, rec(tag))
		require.NoError(t, err)
	}
	require.NoError(t, j.Commit(ctx))
	j.mu.Lock()
	z := j.st.spans.at(1)
	j.mu.Unlock()
	require.Equal(t, x.apos, z.apos)
	require.Equal(t, x.size, z.size, "the new batch ends where stale Y begins")
	require.NoError(t, j.Close())

	_, r = reopen(t, dev, Options{})
	require.Equal(t, []uint64{1, 2, 3}, r.seqs)
	require.Equal(t, rec("z2"), r.records[2])
}

// TestCheckpointLargeStream writes a checkpoint of several chunks through
// odd-sized writes, and reads it back whole; a damaged byte in it makes
// Open fail with ErrCorrupt before LoadCheckpoint sees anything.
func TestCheckpointLargeStream(t *testing.T) {
	ctx := context.Background()
	const size = 3<<20 + 12345
	dev := blockdevtest.NewMem(t, 16<<20, 4096)
	j, err := Format(dev, Options{CheckpointSize: 4 << 20})
	require.NoError(t, err)
	want := make([]byte, size)
	fillSeeded(want, 42)
	require.NoError(t, j.Checkpoint(ctx, 0, func(w io.Writer) error {
		for b := want; len(b) > 0; {
			k := min(len(b), 77777)
			if _, err := w.Write(b[:k]); err != nil {
				return err
			}
			b = b[k:]
		}
		return nil
	}))
	require.Equal(t, int64(size), j.Stats().CheckpointBytes)
	slot := j.slotOff(j.sb.ckpt.slot)
	require.NoError(t, j.Close())
	_, r := reopen(t, dev, Options{})
	require.Equal(t, want, r.ckpt)

	// Damage one byte in the middle of the slot.
	b := make([]byte, 4096)
	_, err = dev.ReadAt(b, slot+2<<20)
	require.NoError(t, err)
	b[100] ^= 1
	_, err = dev.WriteAt(b, slot+2<<20)
	require.NoError(t, err)
	r = &recorder{}
	_, err = Open(dev, Options{}, r)
	require.ErrorIs(t, err, ErrCorrupt)
	require.Contains(t, err.Error(), "checkpoint at")
	require.Zero(t, r.loads)
}

// TestCloseWhileBusy closes the journal under concurrent appenders,
// committers and a checkpointer: every call returns, Close waits for the
// I/O under way, and what was committed is recovered.
func TestCloseWhileBusy(t *testing.T) {
	ctx := context.Background()
	dev := blockdevtest.NewMem(t, 1<<20, 512)
	j, err := Format(dev, Options{CheckpointSize: 64 << 10})
	require.NoError(t, err)
	m := newModel()
	var wg sync.WaitGroup
	started := make(chan struct{}, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				p := []byte(fmt.Sprintf("w%d i%d", w, i))
				seq, err := j.Append(ctx, p)
				if err != nil {
					assert.ErrorIs(t, err, ErrClosed)
					return
				}
				m.appended(seq, p)
				upTo := j.LastSeq()
				if err := j.Commit(ctx); err != nil {
					assert.ErrorIs(t, err, ErrClosed)
					return
				}
				m.commitReturned(upTo)
				if i == 10 {
					started <- struct{}{}
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range j.NeedCheckpoint() {
			upTo := j.LastSeq()
			if err := j.Checkpoint(ctx, upTo, m.captureFor(upTo)); err == nil {
				m.checkpointReturned(upTo)
			}
		}
	}()
	for range 8 {
		<-started
	}
	require.NoError(t, j.Close())
	wg.Wait()
	c := &checker{}
	j, err = Open(dev, Options{}, c)
	require.NoError(t, err)
	require.NoError(t, m.verify(c))
	require.NoError(t, j.Close())
}
