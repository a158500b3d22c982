package snapshot

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// newMemStore512 is newMemStore with a 512-byte block size on both devices,
// so writes of any 512-byte alignment reach the origin.
func newMemStore512(t testing.TB, originSize, storeSize int64, opts Options) (*Store, *blockdev.Mem) {
	t.Helper()
	origin, err := blockdev.NewMem(originSize, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(storeSize, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 1)
	s, err := Format(origin, store, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, origin
}

// TestOriginBufferReadYourWrites writes random ranges (any block alignment,
// partial chunks, overlaps, discards) to the origin after a snapshot, with
// no background commit: every read of the origin sees the writes while the
// origin device itself is untouched (the data is buffered, nothing is
// committed); each chunk is copied once (later writes update the buffer);
// Flush writes everything out and empties the buffer; the snapshot stays
// exact throughout.
func TestOriginBufferReadYourWrites(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 11))
	const cs = 4 << 10
	s, origin := newMemStore512(t, 256<<10, 4<<20, Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: -1})
	o := s.Origin()
	before := blockdevtest.ReadAll(t, origin)
	snap, err := s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	model := bytes.Clone(before)
	size := int64(len(model))
	for round := range shortScale(20) {
		touched := map[int64]bool{}
		for range 40 {
			off := rng.Int64N(size/512) * 512
			n := (1 + rng.Int64N(min(size-off, 3*cs)/512)) * 512
			if rng.IntN(5) == 0 {
				require.NoError(t, o.Discard(off, n), "seed %d", seed)
				clear(model[off : off+n])
			} else {
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				_, err := o.WriteAt(p, off)
				require.NoError(t, err, "seed %d", seed)
				copy(model[off:], p)
			}
			for c := off / cs; c <= (off+n-1)/cs; c++ {
				touched[c] = true
			}
			// A random read, then the whole volume.
			ro := rng.Int64N(size/512) * 512
			rn := (1 + rng.Int64N((size-ro)/512)) * 512
			got := make([]byte, rn)
			_, err := o.ReadAt(got, ro)
			require.NoError(t, err)
			require.Equal(t, -1, blockdevtest.FirstDiff(got, model[ro:ro+rn]), "seed %d round %d: read %d at %d", seed, round, rn, ro)
		}
		require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o), model), "seed %d round %d: origin volume", seed, round)
		if round == 0 {
			// Nothing committed yet: the origin device has not changed, and
			// each touched chunk was copied exactly once.
			require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, origin), before), "seed %d: origin device written before the commit", seed)
			st := s.Stats()
			require.Equal(t, int64(len(touched)), st.bufferedChunks())
			require.Equal(t, uint64(len(touched)), st.usedChunks())
		}
		require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, snap), before), "seed %d round %d: snapshot changed", seed, round)
		if rng.IntN(2) == 0 || round == 0 {
			require.NoError(t, o.Flush())
			require.Zero(t, s.Stats().bufferedChunks())
			require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, origin), model), "seed %d round %d: origin device after Flush", seed, round)
		}
	}
	mustCheck(t, s)
}

// TestOriginBufferFlushDurable: after Flush, a power cut keeps the buffered
// writes; without one, they are lost whole (nothing reached the origin),
// and the snapshot is exact either way.
func TestOriginBufferFlushDurable(t *testing.T) {
	for _, flush := range []bool{true, false} {
		t.Run(fmt.Sprintf("flush=%v", flush), func(t *testing.T) {
			oSim := blockdevtest.MustCrashSim(128<<10, 512)
			sSim := blockdevtest.MustCrashSim(2<<20, 512)
			fillPattern(t, oSim, 5)
			require.NoError(t, oSim.Flush())
			before := blockdevtest.ReadAll(t, oSim)
			opts := Options{ChunkSize: 4 << 10, JournalSize: 128 << 10, CommitInterval: -1}
			s, err := Format(oSim, sSim, opts)
			require.NoError(t, err)
			o := s.Origin()
			_, err = s.CreateSnapshot("snap", o)
			require.NoError(t, err)
			model := bytes.Clone(before)
			p := bytes.Repeat([]byte{0xA5}, 10<<10)
			_, err = o.WriteAt(p, 3<<10)
			require.NoError(t, err)
			copy(model[3<<10:], p)
			require.Positive(t, s.Stats().bufferedChunks())
			if flush {
				require.NoError(t, o.Flush())
			}
			out, err := blockdevtest.CrashAll(blockdevtest.Policy{Mode: blockdevtest.Drop}, oSim, sSim)
			require.NoError(t, err)
			_ = s.Close()
			s2, err := Open(out[0], out[1], opts)
			require.NoError(t, err)
			defer func() { require.NoError(t, s2.Close()) }()
			mustCheck(t, s2)
			want := before
			if flush {
				want = model
			}
			require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s2.Origin()), want), "origin after the crash")
			sv, err := s2.OpenVolume("snap")
			require.NoError(t, err)
			require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, sv), before), "snapshot after the crash")
		})
	}
}

// TestOriginBufferSnapshotAfterWrite: a snapshot or clone of the origin
// taken while writes are buffered holds them, and the chunks they touched
// are copied again for it when overwritten.
func TestOriginBufferSnapshotAfterWrite(t *testing.T) {
	s, origin := newMemStore512(t, 64<<10, 2<<20, Options{ChunkSize: 4 << 10, JournalSize: 128 << 10, CommitInterval: -1})
	o := s.Origin()
	v0 := blockdevtest.ReadAll(t, origin)
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	_, err = o.WriteAt(bytes.Repeat([]byte{1}, 2048), 1024) // partial chunk, buffered
	require.NoError(t, err)
	v1 := blockdevtest.ReadAll(t, o)
	require.Positive(t, s.Stats().bufferedChunks())
	s2, err := s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	require.Zero(t, s.Stats().bufferedChunks(), "snapshot creation drains the buffer")
	_, err = o.WriteAt(bytes.Repeat([]byte{2}, 4096), 0) // the same chunk, whole: copied again for s2
	require.NoError(t, err)
	v2 := blockdevtest.ReadAll(t, o)
	c1, err := s.CreateClone("c1", o) // through an implicit snapshot
	require.NoError(t, err)
	_, err = o.WriteAt(bytes.Repeat([]byte{3}, 512), 512)
	require.NoError(t, err)
	v3 := blockdevtest.ReadAll(t, o)
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s1), v0), "s1")
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, s2), v1), "s2")
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, c1), v2), "c1")
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o), v3), "origin")
	require.NoError(t, o.Flush())
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, origin), v3), "origin device")
	mustCheck(t, s)
}

// TestOriginBufferBackpressure: with a buffer of four chunks and no
// background commit, a writer that finds the buffer full drains it (commit
// first, then the origin); the buffer never holds more than its bound.
// Concurrent writers with a background committer then run against a small
// buffer and end with exact contents.
func TestOriginBufferBackpressure(t *testing.T) {
	const cs = 4 << 10
	s, origin := newMemStore512(t, 256<<10, 4<<20, Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: -1, OriginBuffer: 4 * cs})
	o := s.Origin()
	before := blockdevtest.ReadAll(t, origin)
	_, err := s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	s.ResetLockStats()
	model := bytes.Clone(before)
	for c := range int64(20) {
		p := bytes.Repeat([]byte{byte(c + 1)}, cs)
		_, err := o.WriteAt(p, c*cs)
		require.NoError(t, err)
		copy(model[c*cs:], p)
		st := s.Stats()
		require.LessOrEqual(t, st.bufferedChunks(), int64(4))
		require.Equal(t, c%4+1, st.bufferedChunks(), "chunk %d", c)
	}
	// The writes that found the buffer full (the 5th, 9th, 13th and 17th)
	// are LockStats' buffer waits.
	ls := s.LockStats()
	require.EqualValues(t, 4, ls.BufferWaits)
	require.Positive(t, ls.MaxBufferWait)
	s.ResetLockStats()
	require.Zero(t, s.LockStats().BufferWaits)
	dev := blockdevtest.ReadAll(t, origin)
	require.Equal(t, model[:16*cs], dev[:16*cs], "drained chunks reached the origin device")
	require.Equal(t, before[16*cs:], dev[16*cs:], "buffered chunks did not")
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o), model))

	// Concurrent writers, each on its own region, racing the committer.
	seed := blockdevtest.Seed(t)
	s2, origin2 := newMemStore512(t, 1<<20, 16<<20, Options{ChunkSize: cs, JournalSize: 512 << 10, CommitInterval: time.Millisecond, OriginBuffer: 8 * cs})
	o2 := s2.Origin()
	_, err = s2.CreateSnapshot("snap", o2)
	require.NoError(t, err)
	model2 := blockdevtest.ReadAll(t, o2)
	const writers = 4
	region := int64(len(model2)) / writers
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	for w := range int64(writers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for i := range shortScale(300) {
				off := w*region + rng.Int64N(region/512-16)*512
				p := bytes.Repeat([]byte{byte(w<<6 | int64(i)&63)}, int((1+rng.Int64N(16))*512))
				if _, err := o2.WriteAt(p, off); err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				copy(model2[off:], p) // regions are disjoint
				if i%100 == 99 {
					if _, err := s2.CreateSnapshot(fmt.Sprintf("s%d-%d", w, i), o2); err != nil {
						failed.CompareAndSwap(nil, &err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if p := failed.Load(); p != nil {
		t.Fatalf("seed %d: %v", seed, *p)
	}
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o2), model2), "seed %d: origin volume", seed)
	require.NoError(t, o2.Flush())
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, origin2), model2), "seed %d: origin device", seed)
	mustCheck(t, s2)
}

// TestOriginBufferWriteOutError: a failed origin write while draining
// keeps the data buffered (reads still see it), is returned by the Flush
// (or snapshot) that drained, and, when hit by a writer making room, by the
// next Flush; a later drain writes it out.
func TestOriginBufferWriteOutError(t *testing.T) {
	const cs = 4 << 10
	mem, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	fo := blockdevtest.NewFaulty(mem)
	s, err := Format(fo, store, Options{ChunkSize: cs, JournalSize: 128 << 10, CommitInterval: -1, OriginBuffer: 2 * cs})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	_, err = s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	write := func(c int64, b byte) error {
		_, err := o.WriteAt(bytes.Repeat([]byte{b}, cs), c*cs)
		return err
	}
	require.NoError(t, write(0, 1))
	fo.FailFrom(blockdevtest.OpWrite, 1, blockdev.ErrIO)
	require.ErrorIs(t, o.Flush(), blockdev.ErrIO)
	require.Equal(t, int64(1), s.Stats().bufferedChunks(), "the failed chunk stays buffered")
	got := make([]byte, cs)
	_, err = o.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{1}, cs), got)
	_, err = s.CreateSnapshot("snap2", o)
	require.ErrorIs(t, err, blockdev.ErrIO, "a snapshot cannot be taken over unwritten data")

	require.NoError(t, write(1, 2))
	require.ErrorIs(t, write(2, 3), blockdev.ErrIO, "full buffer, failed drain: the write fails")
	fo.Clear()
	require.ErrorIs(t, o.Flush(), blockdev.ErrIO, "the failure is reported by the next Flush")
	require.Zero(t, s.Stats().bufferedChunks())
	require.NoError(t, o.Flush(), "reported once")
	dev := blockdevtest.ReadAll(t, mem)
	require.Equal(t, bytes.Repeat([]byte{1}, cs), dev[:cs])
	require.Equal(t, bytes.Repeat([]byte{2}, cs), dev[cs:2*cs])
	require.NoError(t, write(2, 3))
}
