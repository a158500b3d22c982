package snapshot

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// clonecountFromCounters requires that Stat of every clone, blank volume
// and their snapshots that fits its chain answers from the counters
// (cloneStatLocked), with the walk's numbers, and returns how many did.
func clonecountFromCounters(t testing.TB, s *Store, why string) int {
	t.Helper()
	n := 0
	for _, info := range s.List() {
		if info.Kind == KindOrigin {
			continue
		}
		s.mu.RLock()
		v := s.volumes[info.ID]
		onZero := v == nil || v.branch == 0
		s.mu.RUnlock()
		if onZero {
			continue
		}
		got, ok, want, err := ctrflakeStatPair(s, info.Name)
		require.NoError(t, err, why)
		if !ok {
			continue
		}
		n++
		require.Equal(t, want, got, "%s: volume %s", why, info.Name)
	}
	return n
}

// clonecountFixture is a store whose origin has snapshots, clones of them
// (written before and after the origin copies the same chunks), a clone
// of a clone, clone snapshots, and a blank volume with a snapshot and a
// clone; chunks are 4 KiB and the origin's size is not a multiple.
type clonecountFixture struct {
	t      *testing.T
	s      *Store
	origin *blockdev.Mem
	store  *blockdev.Mem
}

func clonecountWrite(t *testing.T, v *Volume, chunks ...int) {
	t.Helper()
	buf := make([]byte, 4096)
	for _, c := range chunks {
		buf[0] = byte(c + 1)
		n := min(4096, v.Size()-int64(c)*4096) // the origin's last chunk is a part
		_, err := v.WriteAt(buf[:n], int64(c)*4096)
		require.NoError(t, err)
	}
	require.NoError(t, v.Flush())
}

func newClonecountFixture(t *testing.T) *clonecountFixture {
	origin, _ := blockdev.NewMem(40*4096+2048, 512)
	store, _ := blockdev.NewMem(16<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 4096, JournalSize: 256 << 10})
	require.NoError(t, err)
	return &clonecountFixture{t: t, s: s, origin: origin, store: store}
}

func (f *clonecountFixture) compare(why string) int {
	f.t.Helper()
	requireStatsMatchWalk(f.t, f.s, why)
	n := clonecountFromCounters(f.t, f.s, why)
	mustCheck(f.t, f.s)
	return n
}

// TestCloneCountersScenario runs each kind of change a clone's counters
// follow and compares every Stat with the walk after each, and that the
// counters (not the walk) answered.
func TestCloneCountersScenario(t *testing.T) {
	f := newClonecountFixture(t)
	s := f.s
	o := s.Origin()
	clonecountWrite(t, o, 0, 1, 2, 40)
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	clonecountWrite(t, o, 0, 1) // preserved before the clones write them
	c1, err := s.CreateClone("c1", s1)
	require.NoError(t, err)
	c2, err := s.CreateClone("c2", s1)
	require.NoError(t, err)
	require.Equal(t, 2, f.compare("fresh clones"))
	clonecountWrite(t, c1, 0, 3, 4, 40) // 0 preserved, 3 and 4 not yet, 40 the partial chunk
	clonecountWrite(t, c2, 3, 5)
	f.compare("clone writes")
	clonecountWrite(t, o, 3, 4, 5, 6) // copies that c1 and c2 cover: the fan-out
	f.compare("origin copies under clone writes")
	cs1, err := s.CreateSnapshot("c1-s1", c1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 0, 7)
	_, err = c1.WriteAt(make([]byte, 512), 3*4096+512) // a partial write: read, overlay, redirect
	require.NoError(t, err)
	require.NoError(t, c1.Discard(4*4096, 4096)) // a zero entry
	require.NoError(t, c1.WriteZeroes(8*4096, 4096))
	f.compare("clone snapshot and writes after it")
	cc, err := s.CreateClone("cc", cs1)
	require.NoError(t, err)
	clonecountWrite(t, cc, 0, 9)
	clonecountWrite(t, o, 9, 10, 7) // 9 under cc, through c1-s1 and s1
	cs2, err := s.CreateSnapshot("c1-s2", c1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 7, 11)
	f.compare("clone of a clone snapshot")

	// A blank volume, its snapshot and a clone of it.
	b, err := s.CreateVolume("blank", 20*4096+1024)
	require.NoError(t, err)
	clonecountWrite(t, b, 0, 1, 20)
	bs, err := s.CreateSnapshot("blank-s", b)
	require.NoError(t, err)
	bc, err := s.CreateClone("blank-c", bs)
	require.NoError(t, err)
	clonecountWrite(t, b, 1, 2)
	clonecountWrite(t, bc, 0, 5)
	f.compare("blank volume")

	// Deletes: a snapshot between others, the newest, a clone whose
	// snapshots stay, then collection.
	_, err = s.Delete("c1-s1") // cc's parent point: hidden
	require.Error(t, err)
	d, err := s.DeleteWith("c1-s1", DeleteOptions{Detach: true})
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	f.compare("hidden clone snapshot")
	cs3, err := s.CreateSnapshot("c1-s3", c1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 0, 12)
	d, err = s.Delete("c1-s2")
	require.NoError(t, err)
	require.NoError(t, d.Wait(context.Background()))
	f.compare("middle clone snapshot deleted")
	d, err = s.Delete("c1")
	require.NoError(t, err)
	f.compare("clone deleted, before collection")
	require.NoError(t, d.Wait(context.Background()))
	f.compare("clone deleted")
	_ = cs3
	_ = cs2

	// Rollback and resize of clones.
	require.NoError(t, s.Rollback(context.Background(), bc, bs))
	f.compare("rollback")
	require.NoError(t, s.Resize("c2", 60*4096, ResizeOptions{}))
	f.compare("grown clone")
	require.NoError(t, s.Resize("blank", 4*4096, ResizeOptions{Shrink: true}))
	f.compare("shrunk volume (walks)")
	require.NoError(t, s.Resize("blank", 30*4096, ResizeOptions{}))
	f.compare("regrown volume")

	// Reopen: the counters come from the checkpoint image.
	want := map[string]VolumeStat{}
	for _, v := range s.List() {
		want[v.Name], err = s.Stat(v.Name)
		require.NoError(t, err)
	}
	require.NoError(t, s.Close())
	s, err = Open(f.origin, f.store, Options{})
	require.NoError(t, err)
	f.s = s
	defer func() { require.NoError(t, s.Close()) }()
	require.False(t, s.ctrRebuilt, "the image carries the counters")
	for name, w := range want {
		got, err := s.Stat(name)
		require.NoError(t, err)
		require.Equal(t, w, got, name)
	}
	require.Positive(t, f.compare("reopened"))
	o = s.Origin()
	clonecountWrite(t, o, 11, 12, 13, 14, 15) // fan-out after Open: preserved epochs looked up
	f.compare("origin writes after reopen")
}

// clonecountVersionCopy returns a copy of s's store device with its
// checkpoint image written in version v.
func clonecountVersionCopy(t *testing.T, s *Store, store *blockdev.Mem, v uint32) *blockdev.Mem {
	require.NoError(t, s.Checkpoint(context.Background()))
	s.mu.Lock()
	var c capture
	s.smallStateLocked(&c)
	c.upTo = s.j.LastSeq()
	require.Equal(t, s.lastTreeSeq, c.upTo, "records logged since the tree commit")
	s.mu.Unlock()
	require.NoError(t, s.j.Checkpoint(context.Background(), c.upTo, func(w io.Writer) error {
		e := newEncoder(w)
		c.encodeVersion(e, v)
		return e.finish()
	}))
	return copyMem(t, store)
}

// TestCloneCountersVersion4 opens a store whose image (version 4) has the
// origin's counters only: Open builds the clones' once, and says so.
func TestCloneCountersVersion4(t *testing.T) {
	f := newClonecountFixture(t)
	s := f.s
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	c1, err := s.CreateClone("c1", s1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 1, 2)
	clonecountWrite(t, o, 2, 3)
	_, err = s.CreateSnapshot("c1-s", c1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 2, 4)
	want := map[string]VolumeStat{}
	for _, v := range s.List() {
		want[v.Name], err = s.Stat(v.Name)
		require.NoError(t, err)
	}
	old := clonecountVersionCopy(t, s, f.store, noBranchCtrVersion)
	require.NoError(t, s.Close())
	s, err = Open(f.origin, old, Options{})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	require.True(t, s.ctrRebuilt, "a version 4 image has no branch counters")
	for name, w := range want {
		got, err := s.Stat(name)
		require.NoError(t, err)
		require.Equal(t, w, got, name)
	}
	f.s = s
	require.Equal(t, 2, f.compare("after a version 4 image"))
}

// TestCheckReportsBranchCounters corrupts each branch counter in turn and
// sees Check report it.
func TestCheckReportsBranchCounters(t *testing.T) {
	f := newClonecountFixture(t)
	s := f.s
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	c1, err := s.CreateClone("c1", s1)
	require.NoError(t, err)
	clonecountWrite(t, o, 5)
	clonecountWrite(t, c1, 1, 5)
	_, err = s.CreateSnapshot("c1-s", c1)
	require.NoError(t, err)
	clonecountWrite(t, c1, 1, 6)
	mustCheck(t, s)
	br := s.branches[c1.meta.branch]
	e := br.held[0]
	for _, tc := range []struct {
		name string
		poke func(bc *bcounts, d int64)
	}{
		{"own", func(bc *bcounts, d int64) { bc.own.add(e, d) }},
		{"cov", func(bc *bcounts, d int64) { bc.cov.add(1, d) }},
		{"liveLo", func(bc *bcounts, d int64) { bc.liveLo.add(e+1, d) }},
		{"exclusive", func(bc *bcounts, d int64) { addTo(&bc.excl, e, d) }},
		{"exclusive", func(bc *bcounts, d int64) { addTo(&bc.excl, e+7, d) }}, // an epoch nothing holds
	} {
		s.mu.Lock()
		tc.poke(s.ctr.br[br.id], 1)
		s.mu.Unlock()
		err := s.Check()
		require.ErrorIs(t, err, ErrCorrupt, tc.name)
		require.Contains(t, err.Error(), tc.name)
		s.mu.Lock()
		tc.poke(s.ctr.br[br.id], -1)
		s.mu.Unlock()
		require.NoError(t, s.Check(), tc.name)
	}
}

// TestCloneCountersRandom drives random writes, discards, snapshots,
// clones, deletes and origin writes on a small store with many clones of
// few origin snapshots, comparing every Stat with the walk as it goes.
// BLOCKSNAP_SEED replays a run.
func TestCloneCountersRandom(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 131))
	f := newClonecountFixture(t)
	s := f.s
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	vols := []*Volume{o}
	buf := make([]byte, 4096)
	steps := shortScale(300)
	for i := range steps {
		why := fmt.Sprintf("seed %d step %d", seed, i)
		v := vols[rng.IntN(len(vols))]
		switch r := rng.IntN(20); {
		case r < 10 && v.Kind() != KindSnapshot:
			c := rng.Int64N(v.Size() / 4096)
			_, err := v.WriteAt(buf, c*4096)
			require.NoError(t, err, why)
		case r < 12 && v.Kind() != KindSnapshot && v.Kind() != KindOrigin:
			c := rng.Int64N(v.Size() / 4096)
			require.NoError(t, v.Discard(c*4096, 4096), why)
		case r < 15 && v.Kind() != KindSnapshot:
			sn, err := s.CreateSnapshot(fmt.Sprintf("s%d", i), v)
			require.NoError(t, err, why)
			vols = append(vols, sn)
		case r < 18 && v.Kind() == KindSnapshot:
			cl, err := s.CreateClone(fmt.Sprintf("c%d", i), v)
			require.NoError(t, err, why)
			vols = append(vols, cl)
		case r < 20 && v.Kind() != KindOrigin:
			d, err := s.DeleteWith(v.Info().Name, DeleteOptions{Detach: true})
			require.NoError(t, err, why)
			if rng.IntN(2) == 0 {
				require.NoError(t, d.Wait(context.Background()), why)
			}
			for j := range vols {
				if vols[j] == v {
					vols = append(vols[:j], vols[j+1:]...)
					break
				}
			}
		}
		if i%10 == 0 {
			requireStatsMatchWalk(t, s, why)
			clonecountFromCounters(t, s, why)
		}
	}
	require.NoError(t, s.WaitIdle(context.Background()))
	requireStatsMatchWalk(t, s, fmt.Sprintf("seed %d end", seed))
	require.Positive(t, clonecountFromCounters(t, s, "end"))
	mustCheck(t, s)
}

// TestCloneCountersDeadLiveEntries deletes a clone and, in the same
// record (so that the collector cannot run between), a snapshot of it:
// the live entries still waiting for the collector are then read by the
// snapshots alone, and the counters follow them without a walk (liveLo).
func TestCloneCountersDeadLiveEntries(t *testing.T) {
	for _, newest := range []bool{true, false} {
		t.Run(fmt.Sprintf("newest=%v", newest), func(t *testing.T) {
			f := newClonecountFixture(t)
			s := f.s
			defer func() { require.NoError(t, s.Close()) }()
			s1, err := s.CreateSnapshot("s1", s.Origin())
			require.NoError(t, err)
			c, err := s.CreateClone("c", s1)
			require.NoError(t, err)
			clonecountWrite(t, c, 1) // X: read by c-s1, c-s2 and c
			cs1, err := s.CreateSnapshot("c-s1", c)
			require.NoError(t, err)
			clonecountWrite(t, c, 2) // Y: by c-s2 and c
			cs2, err := s.CreateSnapshot("c-s2", c)
			require.NoError(t, err)
			clonecountWrite(t, c, 3) // Z: by c alone
			f.compare("before")
			gone := cs2
			if !newest {
				gone = cs1
			}
			sc := s.getScratch()
			sc.ops = append(sc.ops, op{kind: opDropVolume, id: c.meta.id}, op{kind: opDropVolume, id: gone.meta.id})
			_, err = s.log(sc)
			s.putScratch(sc)
			require.NoError(t, err)
			f.compare("clone and a snapshot dropped together")
			require.NoError(t, s.WaitIdle(context.Background()))
			f.compare("collected")
		})
	}
}

// clonecountStatsAgree compares Stat of every volume but the origin (whose
// counters Check compares) with the walk: the crash torture and the model
// workload call it after every reopen.
func clonecountStatsAgree(s *Store) error {
	for _, v := range s.List() {
		if v.Kind == KindOrigin {
			continue
		}
		got, ok, want, err := ctrflakeStatPair(s, v.Name)
		if err != nil {
			return err
		}
		if ok && got != want {
			return fmt.Errorf("stat of %s: %+v, the walk gives %+v", v.Name, got, want)
		}
	}
	return nil
}

// TestCloneCountersConcurrent takes, stats and deletes snapshots of a
// clone while writers write the clone and copy origin chunks under it,
// then compares every Stat with the walk (run with -race: the counters
// are read under the shared lock while the apply path changes them, and
// tree commits capture them).
func TestCloneCountersConcurrent(t *testing.T) {
	seed := blockdevtest.Seed(t)
	f := newClonecountFixture(t)
	s := f.s
	defer func() { require.NoError(t, s.Close()) }()
	o := s.Origin()
	s1, err := s.CreateSnapshot("s1", o)
	require.NoError(t, err)
	c, err := s.CreateClone("c", s1)
	require.NoError(t, err)
	stop := make(chan struct{})
	werr := make(chan error, 2)
	for i, v := range []*Volume{o, c} {
		go func() {
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			buf := make([]byte, 4096)
			for {
				select {
				case <-stop:
					werr <- nil
					return
				default:
				}
				if _, err := v.WriteAt(buf, rng.Int64N(40)*4096); err != nil {
					werr <- err
					return
				}
			}
		}()
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	var live []string
	for i := range 30 {
		name := fmt.Sprintf("c-s%d", i)
		_, err := s.CreateSnapshot(name, c)
		require.NoError(t, err)
		live = append(live, name)
		_, err = s.Stat(live[rng.IntN(len(live))])
		require.NoError(t, err)
		_, err = s.Stat("c")
		require.NoError(t, err)
		if len(live) > 3 && rng.IntN(3) == 0 {
			j := rng.IntN(len(live))
			_, err := s.Delete(live[j])
			require.NoError(t, err)
			live = append(live[:j], live[j+1:]...)
		}
	}
	close(stop)
	require.NoError(t, <-werr)
	require.NoError(t, <-werr)
	require.NoError(t, s.WaitIdle(context.Background()))
	f.compare(fmt.Sprintf("seed %d", seed))
}
