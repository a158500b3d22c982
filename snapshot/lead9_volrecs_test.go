package snapshot

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestLead9VolumeRecordsPatched: a capture's volume records, patched for
// the volumes changed since the last capture (volRecsLocked), equal a
// fresh walk of the volumes after every kind of volume change (snapshot,
// clone, blank volume, rename, protect, resize, rollback, delete) in a
// random order, with captures after one change or after several; and
// the store reopened from the checkpoint they were written to lists the
// same volumes. A patch that left a stale record (or dropped a change)
// fails the comparison at the next capture.
func TestLead9VolumeRecordsPatched(t *testing.T) {
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 19))
	const cs = 4 << 10
	opts := Options{ChunkSize: cs, JournalSize: 1 << 20}
	s, origin, store := newMemStore(t, 1024*cs, 64<<20, opts)
	o := s.Origin()
	capture := func(what string) {
		t.Helper()
		s.mu.Lock()
		defer s.mu.Unlock()
		var c capture
		s.smallStateLocked(&c)
		require.Equal(t, s.makeVolRecs(), c.volumes, "after %s", what)
	}
	capture("the first capture")
	// pick returns the name of a random listed volume of kind k, if any.
	pick := func(k Kind) (string, bool) {
		var names []string
		for _, v := range s.List() {
			if v.Kind == k && v.Name != "" {
				names = append(names, v.Name)
			}
		}
		if len(names) == 0 {
			return "", false
		}
		return names[rng.IntN(len(names))], true
	}
	open := func(name string) *Volume {
		v, err := s.OpenVolume(name)
		require.NoError(t, err)
		return v
	}
	changed := 0
	for i := range 400 {
		var what string
		var err error
		switch rng.IntN(9) {
		case 0:
			what = "a snapshot of the origin"
			_, err = s.CreateSnapshot(fmt.Sprintf("s%d", i), o)
		case 1:
			snap, ok := pick(KindSnapshot)
			if !ok {
				continue
			}
			what = "a clone of " + snap
			_, err = s.CreateClone(fmt.Sprintf("c%d", i), open(snap))
		case 2:
			what = "a blank volume"
			_, err = s.CreateVolume(fmt.Sprintf("v%d", i), 1<<20)
		case 3:
			name, ok := pick([]Kind{KindSnapshot, KindClone}[rng.IntN(2)])
			if !ok {
				continue
			}
			what = "a rename of " + name
			err = s.Rename(name, fmt.Sprintf("r%d", i))
		case 4:
			name, ok := pick(KindSnapshot)
			if !ok {
				continue
			}
			what = "a protect change of " + name
			if rng.IntN(2) == 0 {
				err = s.Protect(name)
			} else {
				err = s.Unprotect(name)
			}
		case 5:
			name, ok := pick(KindClone)
			if !ok {
				continue
			}
			what = "a resize of " + name
			err = s.Resize(name, int64(rng.IntN(4)+1)<<20, ResizeOptions{Shrink: true})
		case 6:
			name, ok := pick(KindClone)
			if !ok {
				continue
			}
			v := open(name)
			var snap *Volume
			if snap, err = s.CreateSnapshot(fmt.Sprintf("p%d", i), v); err == nil {
				what = "a rollback of " + name
				err = s.Rollback(t.Context(), v, snap)
			}
		default:
			name, ok := pick([]Kind{KindSnapshot, KindClone}[rng.IntN(2)])
			if !ok {
				continue
			}
			what = "a delete of " + name
			var d *DeleteOp
			if d, err = s.Delete(name); err == nil {
				err = d.Wait(t.Context())
			}
		}
		if err != nil {
			// Refused (a protected or needed snapshot, a size past the
			// bound): nothing changed, which the records must show too.
			t.Logf("%s: %v", what, err)
		} else {
			changed++
		}
		if rng.IntN(3) == 0 {
			capture(what)
		}
	}
	capture("the last change")
	require.Greater(t, changed, 200, "too few changes were made to test the patches")
	require.NoError(t, s.Check())
	before := s.List()
	require.NoError(t, s.Checkpoint(t.Context()))
	require.NoError(t, s.Close())
	s2, err := Open(origin, store, opts)
	require.NoError(t, err)
	defer s2.Close()
	require.Equal(t, before, s2.List())
	require.NoError(t, s2.Check())
}
