package snapshot

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// openFixture is a store with history: a snapshot of the origin whose
// chunks were all copied in random order, a clone of it with writes of its
// own, a snapshot of the clone, and a blank volume with writes. It returns the store and its devices,
// open.
func openFixture(t *testing.T, seed uint64) (*Store, *blockdev.Mem, *blockdev.Mem) {
	const cs = 4096
	// No commit-interval tree commits: the tail replayed after a crash is
	// then whatever the test logged since its last explicit one.
	s, origin, store := newMemStore(t, 32<<20, 96<<20, Options{ChunkSize: cs, CommitInterval: -1})
	rng := rand.New(rand.NewPCG(seed, 11))
	o := s.Origin()
	_, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	buf := make([]byte, cs)
	chunks := int(origin.Size() / cs)
	for _, c := range rng.Perm(chunks) {
		stamp(buf, uint64(c)+1)
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	s1, err := s.OpenVolume("s1")
	require.NoError(t, err)
	cl, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	for range 200 {
		c := rng.IntN(chunks)
		stamp(buf, uint64(c)+1<<32)
		_, err := cl.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	_, err = s.CreateSnapshot("c1", cl)
	require.NoError(t, err)
	vol, err := s.CreateVolume("v", 64<<20) // a root branch, larger than the origin
	require.NoError(t, err)
	for range 100 {
		c := rng.IntN(64 << 20 / cs)
		stamp(buf, uint64(c)+2<<32)
		_, err := vol.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	for range 300 { // some copies at epoch 2
		c := rng.IntN(chunks)
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	require.NoError(t, o.Flush())
	require.NoError(t, s.WaitIdle(context.Background()))
	return s, origin, store
}

// summaries is what Open rebuilt by a walk before: each branch's chunk
// groups and chain summary, and the origin's preserved epochs (looked up
// where unknown).
type summaries struct {
	groups, chain map[uint32][]uint64
	preserved     []uint32
}

func summariesOf(t *testing.T, s *Store) summaries {
	s.mu.Lock()
	defer s.mu.Unlock()
	sm := summaries{groups: map[uint32][]uint64{}, chain: map[uint32][]uint64{}, preserved: make([]uint32, s.chunks)}
	for id, br := range s.branches {
		sm.groups[id] = slices.Clone(br.groups.bits)
		sm.chain[id] = slices.Clone(br.chainGroups.bits)
	}
	for c := range sm.preserved {
		e, err := s.preservedOf(uint64(c))
		require.NoError(t, err)
		sm.preserved[c] = e
	}
	return sm
}

// readVolumes returns every volume's contents by name.
func readVolumes(t *testing.T, s *Store) map[string][]byte {
	out := map[string][]byte{}
	for _, info := range s.List() {
		v, err := s.OpenVolume(info.Name)
		require.NoError(t, err)
		b := make([]byte, v.Size())
		_, err = v.ReadAt(b, 0)
		require.NoError(t, err)
		out[info.Name] = b
	}
	return out
}

// Open after a clean Close reads the superblocks, the space maps and the
// checkpoint image, not the chunk tree: what it used to rebuild by a walk
// (the chunk-group summaries, the preserved epochs) comes from the image
// or from lookups on first use, and matches the walk's result, which a
// store whose image predates the summaries still makes at Open.
func TestOpenWalksNoTree(t *testing.T) {
	s, origin, store := openFixture(t, blockdevtest.Seed(t))
	want := readVolumes(t, s)
	old := version2Copy(t, s, store)
	require.NoError(t, s.Close())

	open := func(store *blockdev.Mem, rebuild bool) (uint64, summaries) {
		s, err := Open(origin, store, Options{})
		require.NoError(t, err)
		defer s.Close()
		require.Equal(t, rebuild, s.rebuild)
		misses, sm := s.m.CacheStats().Misses, summariesOf(t, s)
		checkSummaries(t, s)
		require.Equal(t, want, readVolumes(t, s))
		mustCheck(t, s)
		return misses, sm
	}
	opened, lazy := open(store, false)
	walk, rebuilt := open(old, true)
	require.Equal(t, rebuilt, lazy, "summaries from the image and lookups vs a walk")
	t.Logf("Open read %d pages; with the walk %d", opened, walk)
	require.Greater(t, walk, uint64(12), "the fixture's tree is too small to tell")
	require.Less(t, opened*4, walk, "Open read %d pages, the walk's Open %d", opened, walk)
}

// version2Copy returns a copy of s's store device as the previous code
// would have left it: a tree commit, then a version 2 checkpoint image
// (without chunk-group summaries) at the same record.
func version2Copy(t *testing.T, s *Store, store *blockdev.Mem) *blockdev.Mem {
	require.NoError(t, s.Checkpoint(context.Background()))
	s.mu.Lock()
	var c capture
	s.smallStateLocked(&c)
	c.upTo = s.j.LastSeq()
	require.Equal(t, s.lastTreeSeq, c.upTo, "records logged since the tree commit")
	s.mu.Unlock()
	require.NoError(t, s.j.Checkpoint(context.Background(), c.upTo, func(w io.Writer) error {
		e := newEncoder(w)
		c.encodeVersion(e, noGroupsVersion)
		return e.finish()
	}))
	return copyMem(t, store)
}

// Origin writes after a reopen copy exactly what they copied before it:
// a chunk preserved before the Close is not copied again, a new snapshot
// makes it copy once more, and the origin's Stat agrees.
func TestOpenPreservedOnFirstUse(t *testing.T) {
	s, origin, store := openFixture(t, blockdevtest.Seed(t))
	o := s.Origin()
	buf := make([]byte, 4096)
	write := func(n int64) {
		for c := range n {
			_, err := o.WriteAt(buf, c*4096)
			require.NoError(t, err)
		}
		require.NoError(t, o.Flush())
	}
	write(64) // preserved for s2 now
	stat, err := s.Stat(originName)
	require.NoError(t, err)
	entries := s.Stats().IndexEntries
	require.NoError(t, s.Close())

	s, err = Open(origin, store, Options{})
	require.NoError(t, err)
	defer s.Close()
	got, err := s.Stat(originName) // unknown epochs looked up, not kept
	require.NoError(t, err)
	require.Equal(t, stat, got)
	o = s.Origin()
	write(64)
	require.Equal(t, entries, s.Stats().IndexEntries, "chunks preserved before the reopen copied again")
	s2 := readVolumes(t, s)["s2"]
	_, err = s.CreateSnapshot("s3", o)
	require.NoError(t, err)
	stamp(buf, 99)
	_, err = o.WriteAt(buf, 0)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	require.Equal(t, entries+1, s.Stats().IndexEntries)
	after := readVolumes(t, s)
	require.Equal(t, s2, after["s2"])
	require.Equal(t, make([]byte, 4096), after["s3"][:4096])
	mustCheck(t, s)
}

// A store whose last checkpoint image is version 2 (written before the
// images carried the chunk-group summaries) still opens: Open rebuilds the
// summaries by a walk, and the next tree commit writes a version 3 image.
func TestOpenVersion2Image(t *testing.T) {
	s, origin, store := openFixture(t, blockdevtest.Seed(t))
	want := readVolumes(t, s)
	old := version2Copy(t, s, store)
	require.NoError(t, s.Close())

	s, err := Open(origin, old, Options{})
	require.NoError(t, err)
	require.True(t, s.rebuild, "a version 2 image without a rebuild")
	checkSummaries(t, s)
	require.Equal(t, want, readVolumes(t, s))
	mustCheck(t, s)
	require.NoError(t, s.Close())
	s, err = Open(origin, old, Options{})
	require.NoError(t, err)
	defer s.Close()
	require.False(t, s.rebuild, "Close wrote a version 2 image")
	require.Equal(t, want, readVolumes(t, s))
}

func copyMem(t *testing.T, d *blockdev.Mem) *blockdev.Mem {
	c, err := copyMemErr(d)
	require.NoError(t, err)
	return c
}

func copyMemErr(d *blockdev.Mem) (*blockdev.Mem, error) {
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		return nil, err
	}
	c, err := blockdev.NewMem(d.Size(), d.BlockSize())
	if err != nil {
		return nil, err
	}
	_, err = c.WriteAt(b, 0)
	return c, err
}

// A bad chunk-group summary in an image is ErrCorrupt, never a panic.
func TestLoadGroupsBad(t *testing.T) {
	for i, words := range [][]uint64{
		{1 << 20, 1}, // a word past the summary
		{0, 1, 0, 2}, // the same word twice
		{0, 0},       // a zero word
		{4, 1},       // a bit past the last chunk's group (fuzzStore has 256 chunks)
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			s := fuzzStore(t)
			var buf []byte
			buf = appendUvarints(buf, uint64(len(words)/2))
			for _, w := range words {
				buf = appendUvarints(buf, w)
			}
			d := newCkptReader(buf)
			s.loadGroups(d, s.b0)
			require.ErrorIs(t, d.err, ErrCorrupt)
		})
	}
}

func appendUvarints(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }

func newCkptReader(b []byte) *ckptReader {
	return &ckptReader{r: bufio.NewReader(bytes.NewReader(b)), crc: crc32.New(castagnoli)}
}

// Open after a crash replays the log's tail sorted by (branch, chunk)
// (replay.go): the store it rebuilds reads exactly as the live one did,
// after a tail that changes the same chunks many times over (clone
// rewrites, snapshots that turn live entries into held ones, long discards
// applied in log order between them).
func TestReplaySortedMatchesLive(t *testing.T) {
	seed := blockdevtest.Seed(t)
	s, origin, store := openFixture(t, seed)
	d, err := s.Delete("s2") // the collector moves and deletes the origin's entries, then commits
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	require.NoError(t, s.Checkpoint(context.Background()))
	rng := rand.New(rand.NewPCG(seed, 12))
	cl, err := s.OpenVolume("c")
	require.NoError(t, err)
	buf := make([]byte, 4096)
	for i := range 400 {
		c := rng.IntN(64) // a few chunks, rewritten over and over
		stamp(buf, uint64(i))
		_, err := cl.WriteAt(buf, int64(c)*4096)
		require.NoError(t, err)
		if i%100 == 50 {
			_, err := s.CreateSnapshot(fmt.Sprintf("c%d", i), cl)
			require.NoError(t, err)
			require.NoError(t, cl.Discard(int64(rng.IntN(64))*4096, 100*4096))
		}
	}
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

	s, err = Open(origin, crashed, Options{})
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, want, readVolumes(t, s))
	mustCheck(t, s)
}
