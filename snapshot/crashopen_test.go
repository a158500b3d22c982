package snapshot

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// crashopenImage is a crash image of the leaf-bound tests: the store's
// head (superblock, journal, metadata) as it was at one point of the fill,
// with the index entries the store held then.
type crashopenImage struct {
	head    *blockdev.Mem
	entries int64
	at      int // the writes done before it
}

// crashopenFill formats a store whose origin and data region are
// data-less (blockdevtest.Null) and whose head is a Mem, with a tree
// commit due every leaves touched leaves, takes a snapshot and writes n
// origin chunks once each in a random order, and takes a crash image at
// each of the writes in at (after a Flush, so the journal holds every
// record logged so far). It returns the images and the devices to open
// them with.
func crashopenFill(t *testing.T, seed uint64, n, leaves int, at []int) ([]crashopenImage, *blockdevtest.Null, *blockdevtest.Null, int64, Options) {
	const cs = 4096
	opts := Options{ChunkSize: cs, JournalSize: 16 << 20, MetadataBytes: 16 << 20, MetadataCache: 1 << 20,
		CommitInterval: -1, treeLeaves: leaves}
	headLen := int64(1<<20 + opts.JournalSize + opts.MetadataBytes)
	origin, err := blockdevtest.NewNull(int64(n)*cs, 4096)
	require.NoError(t, err)
	data, err := blockdevtest.NewNull(int64(n+n/4)*cs, 4096)
	require.NoError(t, err)
	head, err := blockdev.NewMem(headLen, 4096)
	require.NoError(t, err)
	s, err := Format(origin, &blockdevtest.Split{Head: head, Tail: data, At: headLen}, opts)
	require.NoError(t, err)
	defer s.Close()
	o := s.Origin()
	_, err = s.CreateSnapshot("s", o)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(seed, 16))
	buf := make([]byte, cs)
	var imgs []crashopenImage
	for i, c := range rng.Perm(n) {
		if len(imgs) < len(at) && i == at[len(imgs)] {
			require.NoError(t, o.Flush())
			s.mu.Lock() // no change in flight: the image holds whole records
			img, err := copyMemErr(head)
			entries := int64(s.ix.len())
			s.mu.Unlock()
			require.NoError(t, err)
			imgs = append(imgs, crashopenImage{head: img, entries: entries, at: i})
		}
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	t.Logf("leaf bound %d: %d tree commits, %d writers waited for one (the bound's), %d wrote one",
		leaves, s.m.CommitStats().Commits, s.leafWaits.Load(), s.leafCommits.Load())
	// Stats reports both: the writes the bound held up.
	require.Equal(t, s.leafWaits.Load()+s.leafCommits.Load(), s.Stats().CommitWaits)
	require.NoError(t, s.Close())
	return imgs, origin, data, headLen, opts
}

// crashopenReplayed opens each image (Open after a power cut at that
// point) and returns the most leaves one replay touched, which the open
// transaction has shadowed once Open returns.
func crashopenReplayed(t *testing.T, imgs []crashopenImage, origin, data *blockdevtest.Null, headLen int64, opts Options) int {
	most := 0
	for _, img := range imgs {
		s, err := Open(origin, &blockdevtest.Split{Head: img.head, Tail: data, At: headLen}, opts)
		require.NoError(t, err)
		replayed := s.m.TouchedLeaves()
		t.Logf("crash after %d writes (%d entries): replay touched %d leaves", img.at, img.entries, replayed)
		require.Equal(t, img.entries, s.Stats().IndexEntries, "crash after %d writes", img.at)
		mustCheck(t, s)
		most = max(most, replayed)
		require.NoError(t, s.Close())
	}
	return most
}

// TestCrashopenReplayBoundedByLeaves: Open after a crash of a random fill
// replays at most about twice the leaf bound's leaves, wherever the crash
// falls, while the same fill with tree commits by change count alone (the
// old rule) leaves tails that touch many times that. The count is the
// leaves the replay shadowed, not a time.
func TestCrashopenReplayBoundedByLeaves(t *testing.T) {
	seed := blockdevtest.Seed(t)
	n, bound := 40000, 32
	if testing.Short() {
		n, bound = 10000, 16 // -race -short: the bound's commits and waits, not the control
	}
	// A record here is one chunk: its changes touch a leaf of each tree,
	// and a split or a merge may shadow a neighbour of each.
	const slack = 4
	rng := rand.New(rand.NewPCG(seed, 17))
	var at []int
	for i := range 6 {
		at = append(at, n/4+i*n/8+rng.IntN(n/8))
	}
	imgs, origin, data, headLen, opts := crashopenFill(t, seed, n, bound, at)
	most := crashopenReplayed(t, imgs, origin, data, headLen, opts)
	require.LessOrEqual(t, most, 2*bound+slack, "a replay after a crash touched more leaves than the bound allows")

	if testing.Short() {
		return
	}
	// The control: commits by change count alone (65,536 > n) leave the
	// whole fill to replay, so the check above can fail.
	imgs, origin, data, headLen, opts = crashopenFill(t, seed, n, 1<<30, at[len(at)-1:])
	// First, read-only with the bound (an Open replays into memory): a
	// change is refused as read-only, not by a tree commit it cannot
	// write, and the store stays usable.
	ro := opts
	ro.ReadOnly, ro.treeLeaves = true, bound
	s, err := Open(origin, &blockdevtest.Split{Head: imgs[0].head, Tail: data, At: headLen}, ro)
	require.NoError(t, err)
	require.GreaterOrEqual(t, s.m.TailLeaves(), 2*bound, "the read-only case needs a tail past the bound")
	require.ErrorIs(t, s.Rename("s", "ro"), ErrReadOnly) // Rename asks for log room first
	require.Equal(t, imgs[0].entries, s.Stats().IndexEntries)
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
	most = crashopenReplayed(t, imgs, origin, data, headLen, opts)
	require.Greater(t, most, 2*bound+slack, "the control's replay touched few leaves: the fill is too small to show the bound")
}
