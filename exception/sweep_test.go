package exception

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestErrorSweep fails the k-th call on the origin device, then on each
// COW device, for every k until a run completes with no fault injected.
// Every call returns an error or succeeds; the origin never reads data that
// was not last written there (or, where a write failed, its old or new
// bytes); after a reopen every snapshot still valid reads exactly what the
// origin held when it was taken and passes Check; nothing leaks.
func TestErrorSweep(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	seed := blockdevtest.Seed(t)
	for _, target := range []string{"origin", "cow0", "cow1"} {
		runs := 0
		for k := 1; ; k++ {
			runs++
			if !sweepRun(t, target, k, seed) {
				break
			}
		}
		t.Logf("%s: %d runs", target, runs)
	}
}

// sweepRun runs the seeded workload with the k-th call on the target device
// failing, and reports whether the fault was injected.
func sweepRun(t *testing.T, target string, k int, seed uint64) bool {
	const size, bs = 64 << 10, 512
	rng := rand.New(rand.NewPCG(seed, 0x5eeb))
	devs := map[string]*blockdevtest.Faulty{}
	for _, name := range []string{"origin", "cow0", "cow1"} {
		size := int64(size)
		if name != "origin" {
			size *= 2
		}
		devs[name] = blockdevtest.NewNamedFaulty(blockdevtest.NewMem(t, size, bs), name)
	}
	devs[target].Inject(blockdevtest.Fail(blockdevtest.Nth(blockdevtest.OpAny, k), blockdev.ErrIO))
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d, %v: "+format, append([]any{seed, devs[target]}, args...)...)
	}

	m := blockdevtest.NewSectorModel()
	m.Add("origin", make([]byte, size))
	o := newOrigin(t, devs["origin"])
	var snaps []*Snapshot
	var names []string
	for step := range 60 {
		if step%20 == 0 {
			name := fmt.Sprint("cow", step/20)
			if _, ok := devs[name]; !ok {
				continue
			}
			s, err := o.CreateSnapshot(devs[name], Options{ChunkSize: 4096, Persistent: true})
			if err == nil {
				snaps = append(snaps, s)
				names = append(names, name)
				m.Snapshot(name, "origin")
			}
			continue
		}
		off := rng.Int64N(size/bs-8) * bs
		n := (1 + rng.Int64N(8)) * bs
		switch rng.IntN(8) {
		case 0:
			if o.Flush() == nil {
				m.Flush("origin")
			}
		case 1:
			if err := o.Discard(off, n); err != nil {
				m.Failed("origin", off, n, nil)
			} else {
				m.Discard("origin", off, n)
			}
		case 2:
			got := make([]byte, n)
			if _, err := o.ReadAt(got, off); err == nil {
				if err := m.CheckRead("origin", off, got); err != nil {
					fail("step %d: %v", step, err)
				}
			}
		default:
			p := blockdevtest.Fill(byte(1+rng.IntN(250)), int(n))
			if _, err := o.WriteAt(p, off); err != nil {
				m.Failed("origin", off, n, p)
			} else {
				m.Write("origin", off, p)
			}
		}
	}
	for _, s := range snaps {
		_ = s.Close()
	}
	_ = o.Close()
	injected := devs[target].Injected() > 0

	// Reopen over the same devices with the fault gone.
	devs[target].Clear()
	o2 := newOrigin(t, devs["origin"])
	defer o2.Close()
	if err := m.CheckRead("origin", 0, blockdevtest.ReadAll(t, o2)); err != nil {
		fail("after reopen: %v", err)
	}
	for _, name := range names {
		s, err := o2.OpenSnapshot(devs[name], Options{})
		if err != nil {
			continue // a store invalidated before its header was whole
		}
		if s.State() != StateValid {
			continue // invalidated by the fault: the snapshot is lost, not wrong
		}
		if err := m.CheckCrash(name, blockdevtest.ReadAll(t, s), blockdevtest.Drop); err != nil {
			fail("after reopen: %v", err)
		}
		rep, err := s.Check()
		require.NoError(t, err, "seed %d, %v", seed, devs[target])
		require.Zero(t, rep.Leaked, "seed %d, %v", seed, devs[target])
	}
	return injected
}
