package snapshot

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"regexp"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/journal"
)

// TestErrorSweep fails the k-th device call (origin and store counted
// together) for every k until a run completes with no fault. Each failed
// run must return the error (never panic or hang); a reopen on the same
// devices must recover, pass Check and hold every snapshot's exact
// contents; and no goroutine may leak.
func TestErrorSweep(t *testing.T) {
	skipUnderRace(t)
	seed := blockdevtest.Seed(t)
	baseline := runtime.NumGoroutine()
	const steps = 40
	for k := 1; ; k++ {
		origin, _ := blockdev.NewMem(64<<10, 512)
		store, _ := blockdev.NewMem(2<<20, 512)
		fillPattern(t, origin, seed)
		var calls atomic.Int64 // both devices' calls, counted together
		fo, fs := blockdevtest.NewFaulty(origin), blockdevtest.NewFaulty(store)
		fail := func(c blockdevtest.Call) error {
			if calls.Add(1) == int64(k) {
				return blockdev.ErrIO
			}
			return nil
		}
		opts := Options{ChunkSize: 4 << 10, JournalSize: 128 << 10, CommitInterval: -1}
		s, err := Format(fo, fs, opts)
		require.NoError(t, err)
		require.NoError(t, s.Close())
		fo.Clear()
		fs.Clear()
		w := &workload{t: t, seed: seed}
		w.initFrom(fo, fs, opts)
		calls.Store(0) // the sweep counts calls after Format and Open
		fo.FailWhen(fail)
		fs.FailWhen(fail)
		var runErr error
		for i := 0; i < steps && runErr == nil; i++ {
			runErr = w.step()
		}
		if runErr == nil {
			runErr = w.s.Close()
		} else {
			_ = w.s.Close()
		}
		injected := fo.Injected() + fs.Injected()
		if injected == 0 {
			require.NoError(t, runErr)
			t.Logf("%d fault points", k-1)
			break
		}
		fo.Clear()
		fs.Clear()
		s2, err := Open(fo, fs, opts)
		require.NoError(t, err, "k=%d: reopen after %v", k, runErr)
		w.s = s2
		w.must(s2.WaitIdle(context.Background()), "idle")
		w.must(s2.Check(), "check after fault %d (%v)", k, runErr)
		w.reconcile(blockdevtest.Policy{Mode: blockdevtest.Keep})
		require.NoError(t, s2.Close())
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), baseline, "goroutines leaked")
}

// initFrom opens an existing store for the workload and loads the model
// from it (a fresh store: just the origin).
func (w *workload) initFrom(origin, store blockdev.Device, opts Options) {
	w.origin, w.store, w.opts = origin, store, opts
	w.rng = newRand(w.seed)
	w.vols, w.maxVols, w.failOK = map[string]*vmodel{}, 6, true
	w.maybeGone, w.maybeNew, w.renamed, w.resized = map[string]bool{}, map[string]*vmodel{}, map[string]string{}, map[string]int64{}
	w.size = origin.Size()
	s, err := Open(origin, store, opts)
	w.must(err, "open")
	w.s, w.bs = s, int64(s.bs)
	data := make([]byte, w.size)
	_, err = origin.ReadAt(data, 0)
	w.must(err, "read origin")
	w.vols[originName] = &vmodel{name: originName, kind: KindOrigin, data: data, durable: append([]byte(nil), data...), vol: s.Origin()}
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 99)) }

// A journal that fails validation at Open gives snapshot's ErrCorrupt,
// still satisfying journal's, and names offsets on the store device. The
// journal's superblock copies sit at journal bytes 0 and one block, its two
// checkpoint slots after them.
func TestOpenCorruptJournalNamesStoreOffset(t *testing.T) {
	for _, what := range []string{"superblock", "checkpoint"} {
		t.Run(what, func(t *testing.T) {
			s, origin, store := newMemStore(t, 1<<20, 8<<20, Options{ChunkSize: 16 << 10})
			_, err := s.CreateSnapshot("s1", s.Origin())
			require.NoError(t, err)
			require.NoError(t, s.Checkpoint(context.Background()))
			g := s.geo
			require.NoError(t, s.Close())

			bs := int64(store.BlockSize())
			jsb := make([]byte, bs)
			_, err = store.ReadAt(jsb, g.journalOff)
			require.NoError(t, err)
			slotSize := int64(binary.LittleEndian.Uint64(jsb[56:]))
			slots := []int64{g.journalOff + 2*bs, g.journalOff + 2*bs + slotSize}
			flip := slots // both checkpoint slots: the current one fails its checksum
			if what == "superblock" {
				flip = []int64{g.journalOff, g.journalOff + bs} // both copies
			}
			for _, off := range flip {
				b := make([]byte, bs)
				_, err := store.ReadAt(b, off)
				require.NoError(t, err)
				b[8] ^= 0xff
				_, err = store.WriteAt(b, off)
				require.NoError(t, err)
			}
			_, err = Open(origin, store, Options{})
			t.Log(err)
			require.ErrorIs(t, err, ErrCorrupt)
			require.ErrorIs(t, err, journal.ErrCorrupt)
			require.Contains(t, err.Error(), fmt.Sprintf("journal in store bytes [%d, %d)", g.journalOff, g.journalOff+g.journalLen))
			if what == "superblock" {
				for _, off := range flip {
					require.Contains(t, err.Error(), fmt.Sprintf("superblock at store byte %d (journal byte %d)", off, off-g.journalOff))
				}
				return
			}
			m := regexp.MustCompile(`checkpoint at store byte (\d+) \(journal byte (\d+)\)`).FindStringSubmatch(err.Error())
			require.NotNil(t, m, "no checkpoint offset in %q", err)
			dev, _ := strconv.ParseInt(m[1], 10, 64)
			rel, _ := strconv.ParseInt(m[2], 10, 64)
			require.Equal(t, g.journalOff+rel, dev)
			in := func(slot int64) bool { return dev > slot && dev <= slot+slotSize }
			require.True(t, in(slots[0]) || in(slots[1]), "store byte %d in neither slot %v", dev, slots)
		})
	}
}
