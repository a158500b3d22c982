package diffstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// An apply interrupted by a failing reader at many points, and by a power
// cut right after, resumes from the state file and ends equal to the
// snapshot; the resumed run skips what the state file recorded.
func TestApplyResumesAfterInterruption(t *testing.T) {
	v := newVolume(t, 5, 1<<20)
	v.scribble(30)
	s0 := v.snapshot()
	v.scribble(30)
	s1 := v.snapshot()
	full := exportFull(t, s0, 0)
	incr := exportIncr(t, s0, s1, 0, 1)
	rng := rand.New(rand.NewPCG(5, 5))
	for trial := range 12 {
		stream, want, from := full, s0, (*Identity)(nil)
		if trial%2 == 1 {
			stream, want, from = incr, s1, &Identity{ID: ident(0).ID, Name: ident(0).Name}
		}
		cut := int64(100 + rng.IntN(len(stream)-200))
		t.Run(fmt.Sprintf("trial=%d/cut=%d", trial, cut), func(t *testing.T) {
			sim := blockdevtest.MustCrashSim(1<<20, 512)
			if from != nil {
				requireCopy(t, s0, sim)
			}
			state := t.TempDir() + "/s"
			if from != nil {
				require.NoError(t, WriteState(state, State{At: from}))
			}
			opts := ApplyOptions{StatePath: state, CheckpointBytes: 32 << 10}
			boom := errors.New("network went away")
			_, err := Apply(context.Background(), &failingReader{r: bytes.NewReader(stream), n: cut, err: boom}, sim, opts)
			require.ErrorIs(t, err, boom)
			require.ErrorContains(t, err, "target is partially applied")
			st, err := ReadState(state)
			require.NoError(t, err)
			require.NotNil(t, st.Partial, "state after interruption: %s", st)
			// Power cut: only what was flushed survives.
			crashed := sim.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Tear, Seed: uint64(trial)})
			res, err := Apply(context.Background(), bytes.NewReader(stream), crashed, opts)
			require.NoError(t, err)
			require.Equal(t, st.Partial.Records, res.Resumed)
			requireSame(t, want, crashed)
			st, err = ReadState(state)
			require.NoError(t, err)
			require.Nil(t, st.Partial)
		})
	}
}

func requireCopy(t *testing.T, src, dst blockdev.Device) {
	t.Helper()
	_, err := dst.WriteAt(image(t, src), 0)
	require.NoError(t, err)
	require.NoError(t, dst.Flush())
}

// A damaged record is refused before any of its bytes reach the target, and
// the state file says exactly how far the target got; the good stream then
// resumes from there.
func TestApplyCorruptStreamLeavesKnownState(t *testing.T) {
	v := newVolume(t, 6, 1<<20)
	v.scribble(40)
	s0 := v.snapshot()
	stream := exportFull(t, s0, 0)
	// Find record 5 and damage a byte of its payload.
	r, err := NewReader(bytes.NewReader(stream))
	require.NoError(t, err)
	var rec Record
	for {
		rec, err = r.Next()
		require.NoError(t, err)
		if rec.Index >= 5 {
			break
		}
	}
	bad := bytes.Clone(stream)
	bad[rec.Pos+12] ^= 0x40

	target, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	state := t.TempDir() + "/s"
	_, err = Apply(context.Background(), bytes.NewReader(bad), target, ApplyOptions{StatePath: state})
	require.ErrorIs(t, err, ErrCorrupt)
	var ce *CorruptError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, rec.Index, ce.Record)
	require.Equal(t, rec.Pos, ce.Offset)
	require.ErrorContains(t, err, fmt.Sprintf("up to record %d", rec.Index))
	st, err := ReadState(state)
	require.NoError(t, err)
	require.Equal(t, &Partial{To: ident(0), Records: rec.Index}, st.Partial)
	// The damaged record's range was not written.
	got := make([]byte, rec.Len)
	_, err = target.ReadAt(got, rec.Off)
	require.NoError(t, err)
	require.True(t, blockdev.IsZero(got))

	// Another stream is refused while the target is partly applied...
	v.scribble(3)
	other := exportIncr(t, s0, v.snapshot(), 0, 1)
	_, err = Apply(context.Background(), bytes.NewReader(other), target, ApplyOptions{StatePath: state})
	require.ErrorIs(t, err, ErrMismatch)
	require.ErrorContains(t, err, "partially applied")
	// ...and the good stream resumes.
	res, err := Apply(context.Background(), bytes.NewReader(stream), target, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	require.Equal(t, rec.Index, res.Resumed)
	requireSame(t, s0, target)
}

func TestApplyGeometryAndStateErrors(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	stream := exportFull(t, m, 0)
	small, err := blockdev.NewMem(512<<10, 512)
	require.NoError(t, err)
	_, err = Apply(context.Background(), bytes.NewReader(stream), small, ApplyOptions{})
	require.ErrorIs(t, err, ErrMismatch)

	state := t.TempDir() + "/s"
	require.NoError(t, writeFile(state, "{not json"))
	_, err = Apply(context.Background(), bytes.NewReader(stream), m, ApplyOptions{StatePath: state})
	require.ErrorIs(t, err, ErrCorrupt)
	_, err = Apply(context.Background(), bytes.NewReader(stream), m, ApplyOptions{StatePath: state, Force: true})
	require.NoError(t, err)
}

// A stream with 512-byte blocks applies onto a 4096-byte-block target by
// read-modify-write of the edges.
func TestApplyOntoLargerBlockTarget(t *testing.T) {
	v := newVolume(t, 7, 1<<20)
	v.scribble(50)
	s0 := v.snapshot()
	v.scribble(20)
	s1 := v.snapshot()
	target, err := blockdev.NewMem(1<<20, 4096)
	require.NoError(t, err)
	state := t.TempDir() + "/s"
	for _, stream := range [][]byte{exportFull(t, s0, 0), exportIncr(t, s0, s1, 0, 1)} {
		_, err = Apply(context.Background(), bytes.NewReader(stream), target, ApplyOptions{StatePath: state})
		require.NoError(t, err)
	}
	requireSame(t, s1, target)
}

func TestApplyStopsWhenContextEnds(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	_, err = m.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0)
	require.NoError(t, err)
	stream := exportFull(t, m, 0)
	ctx, cancel := context.WithCancel(context.Background())
	target, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	state := t.TempDir() + "/s"
	calls := 0
	_, err = Apply(ctx, bytes.NewReader(stream), target, ApplyOptions{StatePath: state, Progress: func(Progress) {
		calls++
		cancel()
	}})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 1, calls)
	st, err := ReadState(state)
	require.NoError(t, err)
	require.Equal(t, int64(1), st.Partial.Records)
}
