package snapshot

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// replayCache is the metadata cache of the read-ahead tests: a few
// hundred KiB, smaller than the fixture's tree (so the replay reads
// leaves), large enough for read-ahead windows of a few leaves each.
const replayCache = 320 << 10

// replayCrashFixture builds a store whose last tree commit holds a tree
// several times replayCache (a delete's collection included), then logs a
// tail on top of it: origin copy-on-writes at two epochs, clone writes
// and a discard. It returns the
// origin, a crash image taken with the tail unreplayed, and every
// volume's contents at the crash.
func replayCrashFixture(t *testing.T, seed uint64) (*blockdev.Mem, *blockdev.Mem, map[string][]byte) {
	const cs = 4096
	s, origin, store := newMemStore(t, 32<<20, 96<<20, Options{ChunkSize: cs, CommitInterval: -1})
	rng := rand.New(rand.NewPCG(seed, 31))
	o := s.Origin()
	chunks := int(origin.Size() / cs)
	buf := make([]byte, cs)
	write := func(v *Volume, c, tag int) {
		stamp(buf, uint64(c)+uint64(tag)<<32)
		_, err := v.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	_, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	for _, c := range rng.Perm(chunks) {
		write(o, c, 1)
	}
	s1, err := s.OpenVolume("s1")
	require.NoError(t, err)
	cl, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	for range 300 {
		write(cl, rng.IntN(chunks), 2)
	}
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	for range 500 {
		write(o, rng.IntN(chunks), 3)
	}
	_, err = s.CreateSnapshot("s3", o)
	require.NoError(t, err)
	d, err := s.Delete("s2") // its entries move to s3's epoch or go; the collector commits
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	require.NoError(t, o.Flush())
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Checkpoint(context.Background())) // the tree the tail lands on

	for range 1500 {
		write(o, rng.IntN(chunks), 4)
	}
	for range 300 {
		write(cl, rng.IntN(chunks), 5)
	}
	require.NoError(t, cl.Discard(int64(rng.IntN(chunks-64))*cs, 64*cs))
	_, err = s.CreateSnapshot("s4", o)
	require.NoError(t, err)
	for range 500 {
		write(o, rng.IntN(chunks), 6)
	}
	require.NoError(t, o.Flush())
	require.NoError(t, cl.Flush())
	require.NoError(t, s.WaitIdle(context.Background()))
	want := readVolumes(t, s)

	s.mu.Lock()
	for s.capOut {
		s.capDone.Wait()
	}
	last, tree := s.j.LastSeq(), s.lastTreeSeq
	crashed, err := copyMemErr(store) // no require under mu: a failure would leave it held
	s.mu.Unlock()
	require.NoError(t, err)
	require.Greater(t, last, tree, "no tail to replay")
	require.NoError(t, s.Close())
	return origin, crashed, want
}

// replayEntries lists the store's index entries in key order.
func replayEntries(t *testing.T, s *Store) []entry {
	var out []entry
	require.NoError(t, s.ix.ascend(entry{}, func(x entry) bool {
		out = append(out, x)
		return true
	}))
	return out
}

// TestReplayReadAheadMatches opens one crash image twice, with the
// replay's read-ahead and without, with a metadata cache smaller than the
// tree, so that the read-ahead goes in windows: both give the live
// store's volumes, the same index entries and the same statistics, and
// pass Check.
func TestReplayReadAheadMatches(t *testing.T) {
	origin, crashed, want := replayCrashFixture(t, blockdevtest.Seed(t))
	type result struct {
		entries []entry
		stats   Stats
		windows int
		read    uint64
	}
	open := func(readAhead bool) result {
		s, err := Open(origin, copyMem(t, crashed), Options{MetadataCache: replayCache, noReadAhead: !readAhead})
		require.NoError(t, err)
		defer s.Close()
		r := result{windows: s.replayWindows, read: s.m.CacheStats().ReadAhead}
		require.Equal(t, want, readVolumes(t, s), "read-ahead %v", readAhead)
		mustCheck(t, s)
		r.entries, r.stats = replayEntries(t, s), s.Stats()
		return r
	}
	with, without := open(true), open(false)
	t.Logf("replay with read-ahead: %d windows, %d nodes read ahead", with.windows, with.read)
	require.Greater(t, with.windows, 2, "the read-ahead did not go in windows: the cache holds the tree")
	require.Positive(t, with.read)
	require.Zero(t, without.read)
	require.Equal(t, without.entries, with.entries)
	require.Equal(t, without.stats, with.stats)
}

// TestReplayReadAheadDeviceError fails one page read of an Open after a
// crash, at points spread over the Open's reads: Open fails with the
// device's error (typed, never a panic or a hang), the read-ahead's among
// them, and the next Open of the same device, which reads, gives the
// store as it was at the crash.
func TestReplayReadAheadDeviceError(t *testing.T) {
	origin, crashed, want := replayCrashFixture(t, blockdevtest.Seed(t))
	opts := Options{MetadataCache: replayCache}
	count := blockdevtest.NewFaulty(copyMem(t, crashed))
	s, err := Open(origin, count, opts)
	require.NoError(t, err)
	reads := count.Count(blockdevtest.OpRead)
	require.Equal(t, want, readVolumes(t, s))
	wantEntries := replayEntries(t, s)
	require.NoError(t, s.Close())

	injected := errors.New("injected read error")
	inReadAhead := 0
	for k := 1; k <= reads; k += max(reads/10, 1) {
		dev := copyMem(t, crashed)
		f := blockdevtest.NewFaulty(dev)
		f.FailNth(blockdevtest.OpRead, k, injected)
		s, err := Open(origin, f, opts)
		if err == nil {
			// The read failed was one Open can do without (none is
			// expected, but what counts is that nothing is lost).
			require.NoError(t, s.Close())
		} else {
			require.ErrorIs(t, err, injected, "read %d of %d", k, reads)
			if strings.Contains(err.Error(), "read-ahead") {
				inReadAhead++
			}
		}
		// Nothing lost: the next Open replays the same tail onto the same
		// tree (the entries are the store's whole state below the
		// volumes, whose contents they address).
		s, err = Open(origin, dev, opts)
		require.NoError(t, err, "Open after a failed Open (read %d)", k)
		require.Equal(t, wantEntries, replayEntries(t, s), "after a failed Open (read %d)", k)
		if k == 1 {
			require.Equal(t, want, readVolumes(t, s))
			mustCheck(t, s)
		}
		require.NoError(t, s.Close())
	}
	t.Logf("%d of the reads failed were the read-ahead's, of %d reads", inReadAhead, reads)
	require.Positive(t, inReadAhead, fmt.Sprintf("no failed read of %d was the read-ahead's: the test proves nothing", reads))
}
