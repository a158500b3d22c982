package snapshot

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// branchEntries counts the entries of branch b in ix.
func branchEntries(t *testing.T, ix pagedIndex, b uint32) int {
	t.Helper()
	n := 0
	require.NoError(t, ix.branchAscend(b, func(entry) bool { n++; return true }))
	return n
}

// TestReadViewDoesNotHoldWriters: while a reader holds a view from
// readView, copy-on-write writes, a new snapshot, a Stat, a Diff and a
// tree commit all go on (they would wait for ever if the reader held
// Store.mu), and the view still reads the index as it was when taken,
// the records not yet tree-committed at that point included.
func TestReadViewDoesNotHoldWriters(t *testing.T) {
	const cs = 4 << 10
	s, _, _ := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs, CommitInterval: -1})
	o := s.Origin()
	a, err := s.CreateSnapshot("a", o)
	require.NoError(t, err)
	buf := make([]byte, cs)
	for c := range 4 { // four copies, in the journal only: no tree commit yet
		_, err := o.WriteAt(buf, int64(c)*cs)
		require.NoError(t, err)
	}
	copied := 0
	ix, done, err := s.readView(func() { copied = len(s.branches) }, false)
	require.NoError(t, err)
	require.Equal(t, 1, copied)
	require.NotNil(t, ix.r, "a writable store reads a committed view")
	require.Equal(t, 4, branchEntries(t, ix, 0))

	// The work runs in hangGuard's goroutine, so it reports by values,
	// checked here (require must not stop the test from another goroutine).
	var werr error
	var mapped int64
	diffChunks := 0
	hangGuard(t, 2*time.Minute, func() {
		for c := 4; c < 8 && werr == nil; c++ {
			_, werr = o.WriteAt(buf, int64(c)*cs)
		}
		if werr != nil {
			return
		}
		var b *Volume
		if b, werr = s.CreateSnapshot("b", o); werr != nil {
			return
		}
		var st VolumeStat
		if st, werr = s.Stat("a"); werr != nil {
			return
		}
		mapped = st.Mapped
		for x, err := range s.Diff(a, b) {
			if err != nil {
				werr = err
				return
			}
			diffChunks += int(x.Len / cs)
		}
		werr = s.Checkpoint(t.Context())
	})
	require.NoError(t, werr)
	require.Equal(t, int64(8*cs), mapped)
	require.Equal(t, 8, diffChunks)
	require.Equal(t, 4, branchEntries(t, ix, 0), "the view changed under its reader")
	done()

	// Nothing logged since the last tree commit: the view is that
	// commit's, and no other commit is made.
	tx := s.m.View()
	defer tx.Release()
	ix2, done2, err := s.readView(func() {}, false)
	require.NoError(t, err)
	require.Equal(t, tx.Tx(), ix2.r.(*meta.View).Tx())
	require.Equal(t, 8, branchEntries(t, ix2, 0))
	done2()
	_, err = o.WriteAt(buf, 9*cs) // one more record: the next view commits it
	require.NoError(t, err)
	ix3, done3, err := s.readView(func() {}, false)
	require.NoError(t, err)
	require.Greater(t, ix3.r.(*meta.View).Tx(), tx.Tx())
	require.Equal(t, 9, branchEntries(t, ix3, 0))
	done3()
	_, _, err = ix.get(0, 0, 1)
	require.Error(t, err, "a released view must not be read")
}

// TestReadViewReadOnly: a read-only store cannot commit, so readView walks
// the live index under the store's lock, and Stat answers as before.
func TestReadViewReadOnly(t *testing.T) {
	const cs = 4 << 10
	s, origin, store := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs})
	o := s.Origin()
	_, err := s.CreateSnapshot("a", o)
	require.NoError(t, err)
	_, err = o.WriteAt(make([]byte, 2*cs), 0)
	require.NoError(t, err)
	require.NoError(t, o.Flush())
	want, err := s.Stat("a")
	require.NoError(t, err)
	require.NoError(t, s.Close())

	ro, err := Open(origin, store, Options{ReadOnly: true})
	require.NoError(t, err)
	defer func() { _ = ro.Close() }()
	ix, done, err := ro.readView(func() {}, false)
	require.NoError(t, err)
	require.Nil(t, ix.r, "a read-only store walks the live index")
	require.Equal(t, 2, branchEntries(t, ix, 0))
	done()
	got, err := ro.Stat("a")
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.Equal(t, int64(2*cs), got.Mapped)
}

// TestCheckReadsRecordsNotYetTreeCommitted: Check on a writable store
// walks a view, and the view includes what was applied since the last
// tree commit: an entry put into the live index just before is found.
func TestCheckReadsRecordsNotYetTreeCommitted(t *testing.T) {
	s, _, _ := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: 4 << 10, CommitInterval: -1})
	_, err := s.CreateSnapshot("a", s.Origin())
	require.NoError(t, err)
	require.NoError(t, s.Check())
	s.mu.Lock()
	ok, err := s.ix.put(entry{b: 0, c: 1, e: 99, loc: locZero}) // epoch 99 was never handed out
	s.mu.Unlock()
	require.NoError(t, err)
	require.True(t, ok)
	// The entry bypassed the journal; a write logs a record, so the view
	// is a new commit, which covers the entry as any applied record.
	_, err = s.Origin().WriteAt(make([]byte, 4<<10), 0)
	require.NoError(t, err)
	rep := s.CheckReport()
	require.False(t, rep.OK())
	require.Contains(t, rep.Problems, "entry (0,1,99) at an epoch never handed out (last 1)")
}

// TestStatOnView: Stat's accounting, walked on a view, for two snapshots
// of the origin and a clone. After a, chunks 0-3 are written (copied for a); after b,
// chunks 2-5 (copied for b, which a reads too where it has no copy of
// its own: chunks 4 and 5).
func TestStatOnView(t *testing.T) {
	const cs = 4 << 10
	s, _, _ := newMemStore(t, 1<<20, 16<<20, Options{ChunkSize: cs, CommitInterval: -1})
	o := s.Origin()
	write := func(from, to int64) {
		t.Helper()
		_, err := o.WriteAt(make([]byte, (to-from)*cs), from*cs)
		require.NoError(t, err)
	}
	_, err := s.CreateSnapshot("a", o)
	require.NoError(t, err)
	write(0, 4)
	_, err = s.CreateSnapshot("b", o)
	require.NoError(t, err)
	write(2, 6)
	st, err := s.Stat("a")
	require.NoError(t, err)
	require.Equal(t, [3]int64{6 * cs, 4 * cs, 2 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})
	st, err = s.Stat("b") // b's copies of chunks 4 and 5 are read by a too
	require.NoError(t, err)
	require.Equal(t, [3]int64{4 * cs, 2 * cs, 2 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})
	b, err := s.OpenVolume("b")
	require.NoError(t, err)
	c, err := s.CreateClone("c", b)
	require.NoError(t, err)
	_, err = c.WriteAt(make([]byte, cs), 5*cs) // the clone's own chunk 5
	require.NoError(t, err)
	st, err = s.Stat("c")
	require.NoError(t, err)
	// c reads chunk 5 from its own copy, 2-4 from b's copies (shared with
	// b), 0-1 from the origin.
	require.Equal(t, [3]int64{4 * cs, 1 * cs, 3 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})
	st, err = s.Stat("b") // b's epoch is now held by c too
	require.NoError(t, err)
	require.Equal(t, [3]int64{4 * cs, 0, 4 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})

	// A clone d of a snapshot of c, which discards chunk 3: d reads 5 from
	// c's copy (through the snapshot), 2 and 4 from b's, 3 as zeros (not
	// mapped), 0-1 from the origin; c's copy is now read by three.
	cSnap, err := s.CreateSnapshot("c-snap", c)
	require.NoError(t, err)
	d, err := s.CreateClone("d", cSnap)
	require.NoError(t, err)
	require.NoError(t, d.Discard(3*cs, cs))
	st, err = s.Stat("d")
	require.NoError(t, err)
	require.Equal(t, [3]int64{3 * cs, 0, 3 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})
	st, err = s.Stat("c")
	require.NoError(t, err)
	require.Equal(t, [3]int64{4 * cs, 0, 4 * cs}, [3]int64{st.Mapped, st.Exclusive, st.Shared})
}
