package blockdevtest

import (
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// SeedEnv names the variable that replays a randomized test: every test that
// draws random numbers takes its seed from Seed, so a failing run's seed,
// set here, replays it.
const SeedEnv = "BLOCKSNAP_SEED"

// TortureEnv names the variable that turns a torture test's default count of
// crash points into a run of that many seconds.
const TortureEnv = "BLOCKSNAP_TORTURE_SECONDS"

// Seed returns the seed for a randomized test: BLOCKSNAP_SEED when set (the
// test fails on a value that is not an unsigned 64-bit integer, rather than
// quietly running another seed), else a fresh random one. It logs the seed
// with the command that replays it.
func Seed(t testing.TB) uint64 {
	t.Helper()
	seed := rand.Uint64()
	if s := os.Getenv(SeedEnv); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("%s=%q is not an unsigned 64-bit integer: %v", SeedEnv, s, err)
		}
		seed = v
	}
	t.Logf("seed %d (replay: %s)", seed, ReplayCommand(t, seed))
	return seed
}

// ReplayCommand is the go test command line, run in the test's package
// directory, that reruns t with seed.
func ReplayCommand(t testing.TB, seed uint64) string {
	parts := strings.Split(t.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	pattern := strings.Join(parts, "/")
	flag := "-run '" + pattern + "'"
	if _, ok := t.(*testing.B); ok {
		flag = "-run '^$' -bench '" + pattern + "'"
	}
	return SeedEnv + "=" + strconv.FormatUint(seed, 10) + " go test -count=1 " + flag + " ."
}

// Budget is how many crash points a torture test runs: a fixed count by
// default (so a seed replays the same run), a tenth of it under -short, or,
// with BLOCKSNAP_TORTURE_SECONDS set, as many as fit in that many seconds.
// The count run is logged when the test ends. It is safe for concurrent use.
type Budget struct {
	limit    int64
	deadline time.Time
	points   atomic.Int64
}

// TortureBudget returns t's budget of crash points with the given default.
// A bad BLOCKSNAP_TORTURE_SECONDS fails the test.
func TortureBudget(t testing.TB, points int) *Budget {
	t.Helper()
	b := &Budget{limit: int64(points)}
	if testing.Short() {
		b.limit = max(1, b.limit/10)
	}
	if s := os.Getenv(TortureEnv); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			t.Fatalf("%s=%q is not a positive number of seconds", TortureEnv, s)
		}
		b.limit = 1<<62 - 1
		b.deadline = time.Now().Add(time.Duration(v) * time.Second)
	}
	t.Cleanup(func() {
		t.Logf("%d crash points (%s=N runs N seconds)", b.Points(), TortureEnv)
	})
	return b
}

// Next reports whether another crash point is due, and counts it if so.
func (b *Budget) Next() bool { return b.NextN(1) }

// NextN is Next for a run that visits n crash points.
func (b *Budget) NextN(n int) bool {
	if !b.deadline.IsZero() && time.Now().After(b.deadline) {
		return false
	}
	if b.points.Add(int64(n)) > b.limit {
		b.points.Add(-int64(n))
		return false
	}
	return true
}

// Points returns the number of crash points counted so far.
func (b *Budget) Points() int { return int(b.points.Load()) }

// Timed reports whether the budget is BLOCKSNAP_TORTURE_SECONDS rather than a
// count; tests use it to scale up what a single crash point does.
func (b *Budget) Timed() bool { return !b.deadline.IsZero() }
