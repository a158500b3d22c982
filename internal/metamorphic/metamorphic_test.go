package metamorphic

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// runsEnv sets how many configurations one run draws (each with its own
// stream); the default keeps the test to a few seconds.
const runsEnv = "BLOCKSNAP_METAMORPHIC_RUNS"

const opsPerRun = 400

// TestMetamorphic runs one random stream per configuration on every target
// and requires every target's read history to equal mem's.
func TestMetamorphic(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	seed := blockdevtest.Seed(t)
	runs := 3
	if testing.Short() {
		runs = 1
	}
	if s := os.Getenv(runsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q is not a positive count", runsEnv, s)
		}
		runs = n
	}
	rng := rand.New(rand.NewPCG(seed, 0x3e7a))
	ts := targets()
	names := make([]string, len(ts))
	for i, tg := range ts {
		names[i] = tg.name
	}
	t.Logf("%d targets, each compared with %s: %s", len(ts), ts[0].name, strings.Join(names, ", "))
	ops, skipped := 0, map[string]string{}
	for r := range runs {
		cfg := drawConfig(rng)
		stream := genOps(rng, opsPerRun, cfg.Size, cfg.BlockSize)
		ops += len(stream)
		t.Logf("run %d: %d ops, %v", r, len(stream), cfg)
		want := mustRun(t, ts[0], cfg, stream)
		for _, tg := range ts[1:] {
			got, skip, err := runTarget(t, tg, cfg, stream)
			if skip != "" {
				skipped[tg.name] = skip
				continue
			}
			if err == nil && diverge(want, got) < 0 {
				continue
			}
			prefix := shrink(t, ts[0], tg, cfg, stream)
			_, _, perr := runTarget(t, tg, cfg, prefix)
			t.Fatalf("target %s differs from %s (seed %d, run %d)\nreplay: %s\nconfiguration: %v\nfirst failure: %v\nshortest failing prefix found (%d of %d ops):\n%s",
				tg.name, ts[0].name, seed, r, blockdevtest.ReplayCommand(t, seed), cfg, failure(want, got, err, perr), len(prefix), len(stream), formatOps(prefix))
		}
	}
	for name, why := range skipped {
		t.Logf("skipped %s: %s", name, why)
	}
	t.Logf("%d configurations, %d ops in their streams, on %d targets: %d ops in all", runs, ops, len(ts)-len(skipped), ops*(len(ts)-len(skipped)))
}

func failure(want, got history, err, prefixErr error) string {
	if err != nil {
		return err.Error()
	}
	if prefixErr != nil {
		return prefixErr.Error()
	}
	return fmt.Sprintf("op %d read different data", diverge(want, got))
}

// runTarget runs ops on a fresh device of tg; the device is closed (and
// its engine checked) before it returns.
func runTarget(t *testing.T, tg target, cfg config, ops []op) (history, string, error) {
	t.Helper()
	dev, cleanup, skip := tg.open(t, cfg)
	if skip != "" {
		return history{}, skip, nil
	}
	h, err := run(dev, ops)
	if cerr := cleanup(); err == nil && cerr != nil {
		err = fmt.Errorf("close after %d ops: %w", len(ops), cerr)
	}
	return h, "", err
}

func mustRun(t *testing.T, tg target, cfg config, ops []op) history {
	t.Helper()
	h, skip, err := runTarget(t, tg, cfg, ops)
	if err != nil || skip != "" {
		t.Fatalf("reference %s: %v %s", tg.name, err, skip)
	}
	return h
}

// fails reports whether ops tell tg from the reference.
func fails(t *testing.T, ref, tg target, cfg config, ops []op) bool {
	want := mustRun(t, ref, cfg, ops)
	got, _, err := runTarget(t, tg, cfg, ops)
	return err != nil || diverge(want, got) >= 0
}

// shrink returns a short prefix of ops, itself shortened, on which tg still
// differs from ref: first the prefix up to the first divergence (or error),
// then each op dropped in turn where the failure stays, last to first.
func shrink(t *testing.T, ref, tg target, cfg config, ops []op) []op {
	want := mustRun(t, ref, cfg, ops)
	got, _, err := runTarget(t, tg, cfg, ops)
	end := len(ops)
	if at := diverge(want, got); at >= 0 {
		end = at + 1
	}
	if err != nil {
		end = len(ops) // the binary search finds the failing call
	}
	// The shortest failing prefix: a binary search, since a failure in a
	// prefix stays in every longer one (the devices are deterministic in
	// what they return, whatever their background work does).
	lo, hi := 1, end
	for lo < hi {
		mid := (lo + hi) / 2
		if fails(t, ref, tg, cfg, ops[:mid]) {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	prefix := append([]op(nil), ops[:hi]...)
	for i := len(prefix) - 2; i >= 0; i-- {
		cand := append(append([]op(nil), prefix[:i]...), prefix[i+1:]...)
		if fails(t, ref, tg, cfg, cand) {
			prefix = cand
		}
	}
	return prefix
}
