package snapshot

// Review tests for the store on the paged metadata layer (issue 13): the
// tree commit against the journal, data-chunk reuse across tree commits
// and replay, read-only opens, and Close then Open.

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// memCopy returns a new Mem holding d's bytes: the image a power cut
// would leave once everything written was flushed.
func memCopy(t *testing.T, d blockdev.Device) *blockdev.Mem {
	t.Helper()
	m, err := blockdev.NewMem(d.Size(), d.BlockSize())
	require.NoError(t, err)
	_, err = m.WriteAt(blockdevtest.ReadAll(t, d), 0)
	require.NoError(t, err)
	return m
}

// reviewFixture builds a store with snapshots, a clone with writes, and
// a deleted snapshot whose chunks the collector freed.
func reviewFixture(t *testing.T) (*Store, *blockdev.Mem, *blockdev.Mem) {
	t.Helper()
	s, origin, store := newMemStore(t, 4<<20, 16<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	fillAt(t, o, 1, 0, 256<<10)
	_, err = s.CreateSnapshot("s2", o)
	require.NoError(t, err)
	c, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	fillAt(t, c, 2, 512<<10, 128<<10)
	_, err = s.CreateSnapshot("gone", o)
	require.NoError(t, err)
	fillAt(t, o, 3, 1<<20, 256<<10)
	require.NoError(t, o.Flush())
	require.NoError(t, c.Flush())
	require.NoError(t, c.Close())
	return s, origin, store
}

// crashAfterTreeCommit runs steps 1 to 3 of a tree commit (freeze, journal
// commit, tree pages and superblock) but not step 4 (the journal's
// checkpoint), as a power cut between them leaves it.
func crashAfterTreeCommit(t *testing.T, s *Store) {
	t.Helper()
	s.mu.Lock()
	for s.capOut {
		s.capDone.Wait()
	}
	c, err := s.captureLocked()
	s.mu.Unlock()
	require.NoError(t, err)
	defer s.endCapture(c)
	require.NoError(t, s.j.Commit(context.Background()))
	require.NotNil(t, c.fz, "the tree changed since the last commit")
	require.NoError(t, c.fz.Write())
}

// A power cut between the tree commit (which records journal record S)
// and the journal's checkpoint at S leaves records up to S in the log
// that the tree already holds, and records after S that it does not:
// written while the commit ran, they delete a snapshot (freeing chunks),
// copy origin chunks and write a clone. Open must apply the records up to
// S only for the branch and volume tables, and those after S whole: every
// volume reads as before the cut, Check passes (no chunk both free and
// mapped, none leaked), and a second Open after Close agrees.
func TestReviewTreeAheadOfJournalCheckpoint(t *testing.T) {
	ctx := context.Background()
	s, origin, store := reviewFixture(t)
	o := s.Origin()
	_, err := s.Delete("gone")
	require.NoError(t, err)
	require.NoError(t, s.WaitIdle(ctx))

	fillAt(t, o, 4, 2<<20, 64<<10) // records before S
	_, err = s.CreateSnapshot("s3", o)
	require.NoError(t, err)
	c := mustOpen(t, s, "c")
	require.NoError(t, c.Discard(512<<10, 32<<10)) // frees two chunks before S
	crashAfterTreeCommit(t, s)
	ckpts := s.j.Stats().Checkpoints
	// Records after S: the journal commits them, the tree does not hold
	// them. A whole-chunk discard of the clone frees its chunks.
	fillAt(t, o, 5, 0, 512<<10)
	fillAt(t, c, 6, 0, 64<<10)
	require.NoError(t, c.Discard(576<<10, 48<<10))
	require.NoError(t, c.Flush())
	require.NoError(t, c.Close())
	require.NoError(t, s.Rename("s3", "s3b"))
	_, err = s.CreateSnapshot("s4", o)
	require.NoError(t, err)
	fillAt(t, o, 8, 0, 128<<10)
	require.NoError(t, o.Flush())
	require.NoError(t, s.j.Commit(ctx))
	require.Less(t, s.lastTreeSeq, s.j.LastSeq(), "records after the tree commit")
	require.Equal(t, ckpts, s.j.Stats().Checkpoints, "no journal checkpoint since the tree commit")
	want := volumeImages(t, s)

	o2, st2 := memCopy(t, origin), memCopy(t, store)
	// A copy of a store open here: its owner record names a live Store.
	r, err := Open(o2, st2, Options{CommitInterval: -1, TakeOver: true})
	require.NoError(t, err)
	require.NoError(t, r.Check())
	require.Equal(t, want, volumeImages(t, r))
	// The replayed store keeps working: copies reuse chunks freed by the
	// replayed delete once a tree commit covers it.
	ro := mustOpen(t, r, "origin")
	fillAt(t, ro, 7, 3<<20, 512<<10)
	require.NoError(t, ro.Flush())
	require.NoError(t, r.Checkpoint(ctx))
	require.NoError(t, r.Check())
	want = volumeImages(t, r)
	require.NoError(t, r.Close())
	r, err = Open(o2, st2, Options{CommitInterval: -1})
	require.NoError(t, err)
	require.NoError(t, r.Check())
	require.Equal(t, want, volumeImages(t, r))
	require.NoError(t, r.Close())
}

// The same cut, opened read-only (meta.OpenOverlay): the overlay takes the
// replayed records in memory, every volume reads as before, Check passes,
// and nothing is written.
func TestReviewTreeAheadReadOnly(t *testing.T) {
	ctx := context.Background()
	s, origin, store := reviewFixture(t)
	o := s.Origin()
	_, err := s.Delete("gone")
	require.NoError(t, err)
	require.NoError(t, s.WaitIdle(ctx))
	fillAt(t, o, 4, 2<<20, 64<<10)
	crashAfterTreeCommit(t, s)
	ckpts := s.j.Stats().Checkpoints
	c := mustOpen(t, s, "c")
	require.NoError(t, c.Discard(512<<10, 32<<10))
	require.NoError(t, c.Close())
	fillAt(t, o, 5, 0, 512<<10)
	require.NoError(t, o.Flush())
	require.NoError(t, s.j.Commit(ctx))
	require.Equal(t, ckpts, s.j.Stats().Checkpoints, "no journal checkpoint since the tree commit")
	want := volumeImages(t, s)

	o2, st2 := memCopy(t, origin), memCopy(t, store)
	before := blockdevtest.ReadAll(t, st2)
	r, err := Open(blockdev.ReadOnly(o2), blockdev.ReadOnly(st2), Options{ReadOnly: true})
	require.NoError(t, err)
	require.NoError(t, r.Check())
	require.Equal(t, want, volumeImages(t, r))
	require.NoError(t, r.Close())
	require.Equal(t, before, blockdevtest.ReadAll(t, st2))
}

// With every data chunk in use but one that a clone's unflushed discard
// freed (held: its transaction is not durable), an origin write that
// needs a copy commits the tree (journal first) and reuses that chunk. A
// power cut at that point, under each policy, leaves a store that opens,
// passes Check, keeps the snapshot exact, and reads the discarded clone
// chunk as zeros or as its old contents, never as the copy's.
func TestReviewHeldChunkReusedAfterTreeCommit(t *testing.T) {
	const cs = 4 << 10
	const dataChunks = 16
	seed := blockdevtest.Seed(t)
	opts := Options{ChunkSize: cs, JournalSize: 256 << 10, MetadataBytes: 1 << 20, CommitInterval: -1, syncWriteBack: true}
	old := bytes.Repeat([]byte{0xc1}, dataChunks*cs)
	for _, p := range blockdevtest.AllPolicies(seed) {
		origin, err := blockdev.NewMem(256<<10, 512)
		require.NoError(t, err)
		fillPattern(t, origin, 9)
		orig := blockdevtest.ReadAll(t, origin)
		sim := blockdevtest.MustCrashSim(superblockSize+identityLen+256<<10+1<<20+dataChunks*cs, 4096)
		s, err := Format(origin, sim, opts)
		require.NoError(t, err)
		require.EqualValues(t, dataChunks, s.geo.dataChunks)
		o := s.Origin()
		s1, err := s.CreateSnapshot("s1", o)
		require.NoError(t, err)
		c, err := s.CreateClone("c", s1)
		require.NoError(t, err)
		_, err = c.WriteAt(old, 0) // every data chunk in use
		require.NoError(t, err)
		require.NoError(t, c.Flush())
		require.NoError(t, c.Discard(3*cs, cs)) // held, not durable
		require.True(t, s.alloc.hasPending())
		_, err = o.WriteAt(bytes.Repeat([]byte{0x0a}, cs), 20*cs)
		require.NoError(t, err, "the copy reuses the held chunk after a tree commit")
		require.False(t, s.alloc.hasPending())

		img := sim.MustCrash(p)
		// s, on the crashed device, is still open: its owner record
		// names a live Store of this process.
		to := opts
		to.TakeOver = true
		r, err := Open(memCopy(t, origin), img, to)
		require.NoError(t, err, "%v", p)
		require.NoError(t, r.Check(), "%v", p)
		imgs := volumeImages(t, r)
		require.True(t, bytes.Equal(orig, imgs["s1"]), "snapshot changed (%v)", p)
		got := imgs["c"][3*cs : 4*cs]
		require.True(t, bytes.Equal(got, old[:cs]) || blockdev.IsZero(got), "discarded clone chunk reads %x... (%v)", got[:4], p)
		require.True(t, bytes.Equal(imgs["c"][4*cs:dataChunks*cs], old[4*cs:]), "%v", p)
		require.NoError(t, r.Close())
		_ = s.Close()
	}
}

// Close of a read-only store closes its metadata overlay, which pins every
// node the journal replay changed: a read-write Close closes its layer,
// and a read-only one must too.
func TestReviewReadOnlyCloseClosesOverlay(t *testing.T) {
	origin, store := roFixture(t)
	s, err := Open(blockdev.ReadOnly(origin), blockdev.ReadOnly(store), Options{ReadOnly: true})
	require.NoError(t, err)
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
	require.ErrorIs(t, s.m.Close(), meta.ErrClosed, "the overlay was left open")
}
