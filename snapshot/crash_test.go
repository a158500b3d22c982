package snapshot

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// shortScale cuts a test's iteration count in -short mode (the race
// detector run in CI); the plain run keeps the full count.
func shortScale(n int) int {
	if testing.Short() {
		return max(1, n/5)
	}
	return n
}

// tortureConfig is a store geometry for the crash torture.
type tortureConfig struct {
	name                 string
	originSize, storeLen int64
	blockSize            int
	chunkSize            int64
	journalSize          int64
	// metadataCache is Options.MetadataCache: tiny, so that the metadata
	// layer evicts and re-reads pages (and writes dirty ones back) under
	// the torture.
	metadataCache int64
}

// TestCrashTorture runs the random workload on CrashSim origin and store
// devices and cuts the power at a random device call, over and over, with
// every policy; after each crash it reopens, runs Check and verifies the
// crash model: every snapshot holds exactly its contents, every sector of
// a writable volume holds its last durable contents or one of the writes
// since (any contents under Tear), volumes exist as their last completed
// operation left them.
//
// Four geometries: 512-byte devices with a roomy store; 4096-byte devices
// with an origin that ends in half a chunk and a small store and journal
// (the store fills, foreground checkpoints happen); 512-byte devices with
// an origin of more than 64 chunks (writes longer than one segment) that
// is not a whole number of chunks; and a metadata cache far smaller than
// the index, so that pages are written back, evicted and re-read. The options that are not stored change
// from one reopen to the next: the origin buffer, the background commit
// interval (off, or running, so the committer and the drain race the
// workload), CheckpointAt up to its maximum, and the NoSpace policy. With
// the committer on, device calls come from background goroutines too, so
// a seed replays the workload but not always the same crash points.
func TestCrashTorture(t *testing.T) {
	seed := blockdevtest.Seed(t)
	configs := []tortureConfig{
		{"512", 128 << 10, 3 << 20, 512, 4 << 10, 128 << 10, 0},
		{"4096-partial-chunk", 300 << 10, 2 << 20, 4096, 8 << 10, 64 << 10, 0},
		{"512-long-writes", 300<<10 + 1536, 1536 << 10, 512, 4 << 10, 48 << 10, 0},
		{"4096-tiny-metadata-cache", 300 << 10, 2 << 20, 4096, 4 << 10, 64 << 10, 4 << 10},
	}
	for i, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			crashTorture(t, seed+uint64(i), cfg, blockdevtest.TortureBudget(t, crashPoints/len(configs)))
		})
	}
}

// crashPoints is the torture's default count of crash points over its
// configurations (a tenth under -short); crashExtra bounds the crash
// points a configuration adds past its share to reach the states it
// checks it crashed in.
const (
	crashPoints = 3000
	crashExtra  = 300
)

func crashTorture(t *testing.T, seed uint64, cfg tortureConfig, budget *blockdevtest.Budget) {
	rng := rand.New(rand.NewPCG(seed, 3))
	crashes := 0
	oSim := blockdevtest.MustCrashSim(cfg.originSize, cfg.blockSize)
	sSim := blockdevtest.MustCrashSim(cfg.storeLen, cfg.blockSize)
	fillPattern(t, oSim, seed)
	require.NoError(t, oSim.Flush())
	policies := blockdevtest.AllPolicies(seed)
	// A power cut over both devices, armed at a random call below.
	newCut := func() *blockdevtest.PowerCut {
		p := policies[crashes%len(policies)]
		p.Seed += uint64(crashes)
		return blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, p)
	}
	tr := newCut()
	// The metadata layer writes back in the writer's calls, so that a
	// seed replays the same device calls.
	opts := Options{ChunkSize: cfg.chunkSize, JournalSize: cfg.journalSize, CommitInterval: -1,
		MetadataCache: cfg.metadataCache, syncWriteBack: true}
	w := newWorkload(t, seed, tr.Device("origin", oSim), tr.Device("store", sSim), opts)
	w.failOK = true
	w.maxVols = 8
	reopen := false
	// The options not stored, varied from one reopen to the next. Origin
	// buffer: the default (never full here), three chunks (writers drain
	// it often) and off.
	buffers := []int64{0, 3 * int64(cfg.chunkSize), -1}
	intervals := []time.Duration{-1, 2 * time.Millisecond, 20 * time.Millisecond}
	ckptAt := []float64{0, minCheckpointAt, 0.3, maxCheckpointAt}
	policiesNS := []NoSpacePolicy{NoSpaceFailWrite, NoSpaceInvalidate}
	// Tree commits by touched leaves: the default (never reached here), and
	// bounds so small that the writers' records start them, and wait for
	// them (bindTail), all the time.
	leafBounds := []int{0, 2, 16}
	buffered, full, committer := 0, 0, 0 // crashes that found origin writes buffered, the store full, the committer on
	// The run must reach the states it is there to crash in (checked at
	// the end). Whether a crash finds origin writes buffered depends on
	// when the committer's drain ran, so a short run may miss them by
	// chance: it goes on past its budget, up to crashExtra more crash
	// points, until it has.
	covered := func() bool {
		return buffered > 0 && (cfg.metadataCache == 0 || w.metaEvicted > 0 && w.metaMisses > 0)
	}
	for extra := 0; ; {
		if !budget.Next() {
			if covered() || extra == crashExtra {
				break
			}
			extra++
		}
		armAt := tr.Calls(blockdevtest.OpAny) + 1 + rng.IntN(150)
		tr.Arm(blockdevtest.OpAny, armAt-tr.Calls(blockdevtest.OpAny))
		var err error
		if reopen { // recovery itself may be hit by the next crash
			w.opts.OriginBuffer = buffers[crashes%len(buffers)]
			w.opts.CommitInterval = intervals[(crashes/3)%len(intervals)]
			w.opts.CheckpointAt = ckptAt[(crashes/2)%len(ckptAt)]
			w.opts.NoSpace = policiesNS[(crashes/5)%len(policiesNS)]
			w.opts.treeLeaves = leafBounds[(crashes/7)%len(leafBounds)]
			err = w.open(nil)
		}
		for err == nil {
			if err = w.step(); err == nil && w.rng.IntN(4) == 0 {
				err = w.s.WaitIdle(context.Background())
			}
			if err == nil && cfg.metadataCache > 0 {
				// Every volume against the model at every step, so that a
				// lost copy-on-write shows at the step that lost it. The
				// check's reads do not count towards the cut (they would
				// take most of the crash points from the operations).
				rest := armAt - tr.Calls(blockdevtest.OpAny)
				tr.Arm(blockdevtest.OpAny, 1<<30)
				err = w.tortchaseVerifyAll()
				armAt = tr.Calls(blockdevtest.OpAny) + max(rest, 1)
				tr.Arm(blockdevtest.OpAny, max(rest, 1))
			}
		}
		if w.s != nil && w.s.ob.n.Load() > 0 {
			buffered++
		}
		if errors.Is(err, ErrNoSpace) {
			full++
		}
		if w.opts.CommitInterval > 0 {
			committer++
		}
		oSim, sSim = w.crashed(tr, err)
		crashes++
		tr = newCut()
		w.origin, w.store = tr.Device("origin", oSim), tr.Device("store", sSim)
		reopen = true
	}
	t.Logf("%d crash points: %d with origin writes buffered, %d with the committer running, %d after ErrNoSpace; "+
		"%d emergency checkpoints crossed, %d snapshots invalidated for room; %d metadata pages read on a miss, %d evicted; "+
		"metadata region grown %d times",
		crashes, buffered, committer, full, w.emergencies, w.invalidated, w.metaMisses, w.metaEvicted, w.metaGrows)
	require.Positive(t, buffered, "no crash hit buffered origin writes")
	if cfg.metadataCache > 0 {
		require.Positive(t, w.metaEvicted, "the tiny metadata cache never evicted")
		require.Positive(t, w.metaMisses, "no metadata page was read back")
	}
}

// crashed completes the power cut, reopens on the surviving images and
// checks them against the model, then resynchronises the model.
func (w *workload) crashed(tr *blockdevtest.PowerCut, cause error) (*blockdevtest.CrashSim, *blockdevtest.CrashSim) {
	w.t.Helper()
	if !errors.Is(cause, blockdevtest.ErrCrashed) && !errors.Is(cause, ErrNoSpace) {
		w.t.Fatalf("seed %d step %d: failed without a crash: %v", w.seed, w.steps, cause)
	}
	out := tr.Cut() // before Close, which would flush
	if w.s != nil {
		w.retire()
		_ = w.s.Close()
		w.s = nil
	}
	oSim, sSim := out[0], out[1]
	w.origin, w.store = oSim, sSim
	s, err := Open(oSim, sSim, w.opts)
	w.must(err, "open after crash (%v, cause %v)", tr, cause)
	w.s = s
	w.must(s.WaitIdle(context.Background()), "collector after crash")
	w.must(s.Check(), "check after crash (%v)", tr)
	w.must(clonecountStatsAgree(s), "stat after crash (%v)", tr)
	w.why = "reconcile"
	w.reconcile(tr.Policy())
	w.retire()
	w.must(s.Close(), "close after crash check")
	w.s = nil
	return oSim, sSim
}

// reconcile compares what survived with the model and adopts it.
func (w *workload) reconcile(p blockdevtest.Policy) {
	w.t.Helper()
	present := map[string]VolumeInfo{}
	for _, vi := range w.s.List() {
		present[vi.Name] = vi
	}
	for name, v := range w.vols {
		if _, ok := present[name]; ok {
			continue
		}
		if nn, ok := w.renamed[name]; ok {
			if _, ok := present[nn]; ok {
				delete(w.vols, name)
				v.name = nn
				w.vols[nn] = v
				continue
			}
		}
		if !w.maybeGone[name] {
			w.t.Fatalf("seed %d step %d: volume %s lost in a crash (%v)", w.seed, w.steps, name, p)
		}
		delete(w.vols, name)
	}
	for name := range present {
		if w.vols[name] != nil {
			continue
		}
		m := w.maybeNew[name]
		if m == nil {
			w.t.Fatalf("seed %d step %d: volume %s appeared in a crash (%v)", w.seed, w.steps, name, p)
		}
		w.vols[name] = m
	}
	for _, name := range w.names(nil) {
		v := w.vols[name]
		vol, err := w.s.OpenVolume(name)
		w.must(err, "open %s after crash", name)
		v.vol = vol
		if v.kind != KindSnapshot {
			w.adoptSize(v, vol.Size())
		}
		buf := make([]byte, len(v.data))
		_, err = vol.ReadAt(buf, 0)
		w.must(err, "read %s after crash", name)
		if v.kind == KindSnapshot {
			if i := blockdevtest.FirstDiff(buf, v.data); i >= 0 {
				w.t.Fatalf("seed %d step %d: snapshot %s changed in a crash (%v) at byte %d", w.seed, w.steps, name, p, i)
			}
			continue
		}
		w.checkSectors(v, buf, p)
		v.data = bytes.Clone(buf)
		w.makeDurable(v)
	}
	w.maybeGone, w.maybeNew, w.renamed, w.resized = map[string]bool{}, map[string]*vmodel{}, map[string]string{}, map[string]int64{}
}

// checkSectors verifies each 512-byte sector of a writable volume holds its
// durable contents or those of a write since.
func (w *workload) checkSectors(v *vmodel, got []byte, p blockdevtest.Policy) {
	const sec = 512
	for off := int64(0); off < int64(len(got)); off += sec {
		g := got[off : off+sec]
		if bytes.Equal(g, v.durable[off:off+sec]) {
			continue
		}
		ok := false
		for _, pw := range v.pending {
			if off < pw.off || off >= pw.off+pw.n {
				continue
			}
			if p.Mode == blockdevtest.Tear || (pw.data == nil && blockdev.IsZero(g)) ||
				(pw.data != nil && bytes.Equal(g, pw.data[off-pw.off:off-pw.off+sec])) {
				ok = true
				break
			}
		}
		if !ok {
			for i, h := range v.history {
				if off >= h.off && off < h.off+h.n && (h.data == nil && blockdev.IsZero(g) || h.data != nil && bytes.Equal(g, h.data[off-h.off:off-h.off+sec])) {
					w.t.Logf("sector matches history write %d/%d (step %d, %d at %d, discard %v)", i, len(v.history), h.step, h.n, h.off, h.data == nil)
				}
			}
			for _, h := range v.history[max(0, len(v.history)-40):] {
				if h.n == 0 || off >= h.off && off < h.off+h.n {
					w.t.Logf("history: step %d, %d at %d, discard %v %s", h.step, h.n, h.off, h.data == nil, map[bool]string{true: string(h.data)}[h.n == 0])
				}
			}
			w.t.Logf("pending: %d writes; zero sector %v; durable zero %v", len(v.pending), blockdev.IsZero(g), blockdev.IsZero(v.durable[off:off+sec]))
			w.diagSector(v, off, g)
			w.t.Fatalf("seed %d step %d: %s sector at %d holds neither its durable contents nor a later write (%v)",
				w.seed, w.steps, v.name, off, p)
		}
	}
}
