package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Review of the pool features where they meet the crash model: blank
// volumes (one larger than the origin), their snapshots, clones, resets,
// zeroing writes, discards and deletes, the origin-less store, and
// GrowMetadata, each cut short by a power cut at every device call in
// turn. After each cut the image is opened read-only (which replays in
// memory) and read-write; both pass Check and read the same, and every
// volume holds what the last completed step left, or, for the volumes the
// interrupted step touched, per sector what it was before or after it.

// poolModel is what each volume reads, by name.
type poolModel map[string][]byte

func (m poolModel) clone() poolModel {
	out := poolModel{}
	for k, v := range m {
		out[k] = bytes.Clone(v)
	}
	return out
}

// poolStep changes the store and the model the same way. The model is
// changed whatever the error: it is the state the step would have left,
// which a power cut in it may have left too.
type poolStep struct {
	what string
	run  func(s *Store, m poolModel) error
}

func openNamed(s *Store, name string) (*Volume, error) { return s.OpenVolume(name) }

func stepCreate(name string, size int64) poolStep {
	return poolStep{"create " + name, func(s *Store, m poolModel) error {
		_, err := s.CreateVolume(name, size)
		m[name] = make([]byte, size)
		return err
	}}
}

// stepWrite writes n bytes of b at off of name and flushes; b < 0 writes
// zeroes with WriteZeroes, b == -2 discards.
func stepWrite(name string, b int, off, n int64) poolStep {
	return poolStep{fmt.Sprintf("write %d of %d at %d of %s", b, n, off, name), func(s *Store, m poolModel) error {
		v, err := openNamed(s, name)
		if err != nil {
			return err
		}
		switch b {
		case -1:
			err = v.WriteZeroes(off, n)
		case -2:
			err = v.Discard(off, n)
		default:
			_, err = v.WriteAt(bytes.Repeat([]byte{byte(b)}, int(n)), off)
		}
		if err == nil {
			err = v.Flush()
		}
		if b < 0 {
			clear(m[name][off : off+n])
		} else {
			copy(m[name][off:], bytes.Repeat([]byte{byte(b)}, int(n)))
		}
		return err
	}}
}

func stepSnapshot(name, of string) poolStep {
	return poolStep{"snapshot " + name + " of " + of, func(s *Store, m poolModel) error {
		v, err := openNamed(s, of)
		if err == nil {
			_, err = s.CreateSnapshot(name, v)
		}
		m[name] = bytes.Clone(m[of])
		return err
	}}
}

func stepClone(name, of string) poolStep {
	return poolStep{"clone " + name + " of " + of, func(s *Store, m poolModel) error {
		v, err := openNamed(s, of)
		if err == nil {
			_, err = s.CreateClone(name, v)
		}
		m[name] = bytes.Clone(m[of])
		return err
	}}
}

func stepRollback(vol, to string) poolStep {
	return poolStep{"reset " + vol + " to " + to, func(s *Store, m poolModel) error {
		v, err := openNamed(s, vol)
		if err != nil {
			return err
		}
		snap, err := openNamed(s, to)
		if err == nil {
			err = s.Rollback(context.Background(), v, snap)
		}
		m[vol] = bytes.Clone(m[to])
		return err
	}}
}

func stepDelete(name string) poolStep {
	return poolStep{"delete " + name, func(s *Store, m poolModel) error {
		d, err := s.DeleteWith(name, DeleteOptions{Detach: true})
		if err == nil {
			err = d.Wait(context.Background())
		}
		delete(m, name)
		return err
	}}
}

// stepResize resizes name to size bytes (shrinking if asked): the tail
// past the old size reads zeros.
func stepResize(name string, size int64) poolStep {
	return poolStep{fmt.Sprintf("resize %s to %d", name, size), func(s *Store, m poolModel) error {
		err := s.Resize(name, size, ResizeOptions{Shrink: size < int64(len(m[name]))})
		out := make([]byte, size)
		copy(out, m[name])
		m[name] = out
		return err
	}}
}

func stepGrowMetadata() poolStep {
	return poolStep{"grow metadata", func(s *Store, _ poolModel) error {
		_, err := s.GrowMetadata(context.Background(), s.cs)
		return err
	}}
}

// poolScript is the scenario: with an origin of originSize bytes (0: no
// origin), a blank volume larger than it and everything done to it.
func poolScript(originSize int64) []poolStep {
	const mb = 1 << 20
	steps := []poolStep{
		stepCreate("b", 3*mb),
		stepWrite("b", 1, 0, 64<<10),
		stepWrite("b", 2, 5*mb/2, 48<<10), // past the origin's end
		stepSnapshot("b@1", "b"),
		stepClone("bc", "b@1"),
		stepWrite("bc", 3, 32<<10, 64<<10),
		stepWrite("b", -1, 16<<10, 32<<10), // zero mappings
		stepWrite("bc", -2, 5*mb/2, 16<<10),
		stepSnapshot("bc@1", "bc"),
		stepWrite("bc", 4, 0, 3*mb),
		stepRollback("bc", "bc@1"),
		stepRollback("bc", "b@1"), // to an ancestor's snapshot
		stepWrite("b", 5, 2*mb, 16<<10),
		stepRollback("b", "b@1"),
		stepGrowMetadata(),
		stepCreate("small", 64<<10),
		stepWrite("small", 6, 0, 64<<10),
		stepDelete("b@1"), // has a clone: detached
		stepWrite("bc", 7, 3*mb-16<<10, 16<<10),
		stepResize("bc", 4*mb),
		stepWrite("bc", 10, 4*mb-32<<10, 32<<10), // past its old end
		stepResize("bc", 3*mb-16<<10),            // a shrink into a written chunk
		stepResize("bc", 3*mb),
		stepDelete("bc@1"),
		stepDelete("b"),
		stepSnapshot("bc@2", "bc"),
		stepDelete("bc"),
		stepCreate("b", mb), // the name again, on a new branch
		stepWrite("b", 8, 0, 16<<10),
	}
	if originSize > 0 {
		steps = append(steps,
			stepSnapshot("o@1", originName),
			stepClone("oc", "o@1"),
			stepWrite(originName, 9, 0, originSize),
			stepWrite("oc", -1, 0, originSize),
			stepDelete("o@1"),
		)
	}
	return steps
}

// poolCrashRun formats a store on fresh CrashSims, runs the script with a
// power cut armed at the k-th device call (0: none), and returns the
// images the cut left (nil if it never fired), the models before and after
// the step it interrupted, and that step's index.
func poolCrashRun(t *testing.T, originSize int64, k int, p blockdevtest.Policy, opts Options) (origin blockdev.Device, imgs []*blockdevtest.CrashSim, before, after poolModel, at int) {
	t.Helper()
	tr := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, p)
	store := tr.Device("store", blockdevtest.MustCrashSim(24<<20, 4096))
	var o blockdev.Device
	m := poolModel{}
	if originSize > 0 {
		sim := blockdevtest.MustCrashSim(originSize, 4096)
		fillPattern(t, sim, 7)
		require.NoError(t, sim.Flush())
		o = tr.Device("origin", sim)
		m[originName] = readAll(t, o)
	}
	s, err := Format(o, store, opts)
	require.NoError(t, err)
	if k > 0 {
		tr.Arm(blockdevtest.OpAny, k)
	}
	script := poolScript(originSize)
	for i, st := range script {
		next := m.clone()
		err := st.run(s, next)
		if tr.Fired() {
			_ = s.Close()
			out := tr.Cut()
			if originSize > 0 {
				origin = out[1]
			}
			return origin, out[:1], m, next, i
		}
		require.NoError(t, err, "step %d: %s", i, st.what)
		m = next
		if k == 0 { // the uninterrupted run: every step reads as the model
			requirePoolModel(t, s, m, m, fmt.Sprintf("after step %d (%s)", i, st.what))
			require.NoError(t, s.Check(), "after step %d (%s)", i, st.what)
		}
	}
	err = s.Close()
	if tr.Fired() { // the cut came in Close
		out := tr.Cut()
		if originSize > 0 {
			origin = out[1]
		}
		return origin, out[:1], m, m, len(script)
	}
	require.NoError(t, err)
	return nil, nil, m, m, len(script)
}

// requirePoolModel checks that s holds the volumes of before or after
// (the step between them interrupted), each sector as one of them.
func requirePoolModel(t *testing.T, s *Store, before, after poolModel, msg string) map[string][]byte {
	t.Helper()
	got := map[string][]byte{}
	for _, i := range s.List() {
		v, err := s.OpenVolume(i.Name)
		require.NoError(t, err, msg)
		got[i.Name] = readAll(t, v)
	}
	for name, b := range got {
		x, inX := before[name]
		y, inY := after[name]
		require.True(t, inX || inY, "%s: volume %s appeared", msg, name)
		if !inX || !inY || len(x) != len(b) || len(y) != len(b) {
			require.True(t, inX && bytes.Equal(b, x) || inY && bytes.Equal(b, y), "%s: volume %s matches neither state", msg, name)
			continue
		}
		for off := 0; off < len(b); off += blockdevtest.SectorSize {
			sec := b[off : off+blockdevtest.SectorSize]
			require.True(t, bytes.Equal(sec, x[off:off+len(sec)]) || bytes.Equal(sec, y[off:off+len(sec)]),
				"%s: volume %s sector at %d matches neither state: got %#x, before %#x, after %#x", msg, name, off, sec[0], x[off], y[off])
		}
	}
	for name := range before {
		if _, ok := after[name]; ok {
			_, present := got[name]
			require.True(t, present, "%s: volume %s lost", msg, name)
		}
	}
	return got
}

// openBoth opens the crash image read-only, then read-write, checks both
// and compares them; it returns the read-write store.
func openBoth(t *testing.T, origin blockdev.Device, store blockdev.Device, opts Options, before, after poolModel, msg string) *Store {
	t.Helper()
	ro := opts
	ro.ReadOnly = true
	r, err := Open(origin, store, ro)
	require.NoError(t, err, "read-only open: %s", msg)
	require.NoError(t, r.Check(), "read-only check: %s", msg)
	roGot := requirePoolModel(t, r, before, after, "read-only: "+msg)
	require.NoError(t, r.Close())

	rw := opts
	rw.TakeOver = true // the crashed Store of this process still holds the record
	s, err := Open(origin, store, rw)
	require.NoError(t, err, "open: %s", msg)
	require.NoError(t, s.WaitIdle(context.Background()))
	require.NoError(t, s.Check(), "check: %s", msg)
	rwGot := requirePoolModel(t, s, before, after, msg)
	require.Equal(t, slices.Sorted(maps.Keys(roGot)), slices.Sorted(maps.Keys(rwGot)), "read-only and read-write opens list different volumes: %s", msg)
	for name, b := range rwGot {
		require.True(t, bytes.Equal(b, roGot[name]), "%s: %s reads differently read-only", msg, name)
	}
	return s
}

func TestReviewPoolCrashEveryCall(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for _, tc := range []struct {
		name       string
		originSize int64
	}{
		{"no-origin", 0},
		{"origin", 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := Options{ChunkSize: 16 << 10, JournalSize: 256 << 10, MetadataBytes: 1 << 20, CommitInterval: -1, MaxVolumeSize: 4 << 20, syncWriteBack: true}
			// The uninterrupted run, then a clean reopen of what it left.
			_, _, final, _, _ := poolCrashRun(t, tc.originSize, 0, blockdevtest.Policy{}, opts)
			require.NotEmpty(t, final)

			policies := blockdevtest.AllPolicies(seed)[:3] // no Tear: the sector check wants old or new
			// Every call under BLOCKSNAP_TORTURE_SECONDS; otherwise every
			// 13th (37th with -short), from a seeded start.
			stride := 13
			if testing.Short() {
				stride = 37
			}
			if os.Getenv("BLOCKSNAP_TORTURE_SECONDS") != "" {
				stride = 1
			}
			cuts := 0
			for k := 1 + int(seed%uint64(stride)); ; k += stride {
				p := policies[k%len(policies)]
				origin, imgs, before, after, at := poolCrashRun(t, tc.originSize, k, p, opts)
				if imgs == nil {
					t.Logf("%d cut points", cuts)
					return
				}
				cuts++
				msg := fmt.Sprintf("cut at call %d (%v) in step %d", k, p, at)
				s := openBoth(t, origin, imgs[0], opts, before, after, msg)
				// The store goes on: a new blank volume, written and read back.
				v, err := s.CreateVolume(fmt.Sprintf("after-%d", k), 64<<10)
				require.NoError(t, err, msg)
				fillAt(t, v, 0xee, 0, 16<<10)
				require.NoError(t, s.Check(), msg)
				require.NoError(t, s.Close(), msg)
			}
		})
	}
}
