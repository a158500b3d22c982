package blockdevtest_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func TestSeedFromEnvironment(t *testing.T) {
	t.Setenv(blockdevtest.SeedEnv, "12345")
	require.Equal(t, uint64(12345), blockdevtest.Seed(t))
	require.Equal(t, "BLOCKSNAP_SEED=7 go test -count=1 -run '^TestSeedFromEnvironment$' .", blockdevtest.ReplayCommand(t, 7))
	t.Run("sub test", func(t *testing.T) {
		require.Equal(t, "BLOCKSNAP_SEED=7 go test -count=1 -run '^TestSeedFromEnvironment$/^sub_test$' .", blockdevtest.ReplayCommand(t, 7))
	})
}

// fatalRecorder is a testing.TB whose Fatalf records the failure and ends
// the goroutine, so a test can check that a helper fails its test.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(r)
}

func (r *fatalRecorder) Logf(string, ...any) {}

func failsWith(t *testing.T, f func(tb testing.TB)) string {
	r := &fatalRecorder{TB: t}
	func() {
		defer func() {
			if p := recover(); p != nil && p != any(r) {
				panic(p)
			}
		}()
		f(r)
	}()
	return r.msg
}

func TestSeedRejectsBadValue(t *testing.T) {
	t.Setenv(blockdevtest.SeedEnv, "0xzz")
	msg := failsWith(t, func(tb testing.TB) { blockdevtest.Seed(tb) })
	require.Contains(t, msg, "BLOCKSNAP_SEED")
}

func TestTortureBudgetCounts(t *testing.T) {
	t.Setenv(blockdevtest.TortureEnv, "")
	b := blockdevtest.TortureBudget(t, 20)
	want := 20
	if testing.Short() {
		want = 2
	}
	n := 0
	for b.Next() {
		n++
	}
	require.Equal(t, want, n)
	require.Equal(t, want, b.Points())
	require.False(t, b.Timed())

	t.Setenv(blockdevtest.TortureEnv, "soon")
	msg := failsWith(t, func(tb testing.TB) { blockdevtest.TortureBudget(tb, 1) })
	require.Contains(t, msg, blockdevtest.TortureEnv)
}

func TestFirstDiff(t *testing.T) {
	require.Equal(t, -1, blockdevtest.FirstDiff([]byte("abc"), []byte("abc")))
	require.Equal(t, 1, blockdevtest.FirstDiff([]byte("abc"), []byte("axc")))
	require.Equal(t, 2, blockdevtest.FirstDiff([]byte("ab"), []byte("abc")))
	require.Equal(t, 0, blockdevtest.FirstDiff(nil, []byte("a")))
	require.Equal(t, -1, blockdevtest.FirstDiff(nil, []byte{}))
}

func TestInjectorsCompose(t *testing.T) {
	f := blockdevtest.NewNamedFaulty(blockdevtest.NewMem(t, 1<<20, 512), "store")
	f.Inject(blockdevtest.Fail(blockdevtest.And(blockdevtest.Kind(blockdevtest.OpWrite), blockdevtest.Touching(4096, 512)), blockdev.ErrIO))
	f.Inject(blockdevtest.Fail(blockdevtest.Nth(blockdevtest.OpFlush, 2), blockdev.ErrNotSupported))
	require.Equal(t, `store: fail every write and touching [4096, 4608) with "blockdev: I/O error"; fail the 2nd flush with "blockdev: not supported"`, f.String())

	_, err := f.WriteAt(blockdevtest.Fill(1, 512), 0)
	require.NoError(t, err)
	_, err = f.WriteAt(blockdevtest.Fill(1, 1024), 3584)
	require.ErrorIs(t, err, blockdev.ErrIO)
	require.ErrorIs(t, err, blockdevtest.ErrInjected)
	_, err = f.ReadAt(make([]byte, 512), 4096)
	require.NoError(t, err, "reads are not chosen")
	require.NoError(t, f.Flush())
	err = f.Flush()
	require.ErrorIs(t, err, blockdev.ErrNotSupported)
	require.Equal(t, []string{
		`2nd write (call 2) at 3584+1024 on store: fail every write and touching [4096, 4608) with "blockdev: I/O error"`,
		`2nd flush (call 5) on store: fail the 2nd flush with "blockdev: not supported"`,
	}, f.Faults())
	require.Contains(t, err.Error(), "2nd flush (call 5) on store")

	// Or, FromNth and Randomly: a seeded random choice is repeatable.
	pick := func(seed uint64) []int {
		g := blockdevtest.NewFaulty(blockdevtest.NewMem(t, 1<<20, 512))
		g.Inject(blockdevtest.Fail(blockdevtest.Or(blockdevtest.Randomly(0.3, seed), blockdevtest.FromNth(blockdevtest.OpAny, 40)), blockdev.ErrIO))
		var failed []int
		for i := 1; i <= 45; i++ {
			if g.Flush() != nil {
				failed = append(failed, i)
			}
		}
		return failed
	}
	a := pick(9)
	require.Equal(t, a, pick(9))
	require.Subset(t, a, []int{40, 41, 42, 43, 44, 45})
	require.Less(t, len(a), 45)
}

func TestPowerCutAtNthFlush(t *testing.T) {
	pc := blockdevtest.NewPowerCut(blockdevtest.OpFlush, 2, blockdevtest.Policy{Mode: blockdevtest.Drop})
	a := pc.NewDevice(t, "data", 64<<10, 4096)
	b := pc.NewDevice(t, "meta", 64<<10, 512)
	require.Equal(t, "power cut armed for the 2nd flush, policy drop(seed=0)", pc.String())

	_, err := a.WriteAt(blockdevtest.Fill(1, 4096), 0)
	require.NoError(t, err)
	require.NoError(t, a.Flush())
	_, err = b.WriteAt(blockdevtest.Fill(2, 512), 512)
	require.NoError(t, err)
	_, err = a.WriteAt(blockdevtest.Fill(3, 4096), 4096)
	require.NoError(t, err)
	require.False(t, pc.Fired())
	select {
	case <-pc.Done():
		t.Fatal("the power went early")
	default:
	}
	err = b.Flush() // the 2nd flush: the power goes before it
	require.ErrorIs(t, err, blockdevtest.ErrCrashed)
	require.True(t, pc.Fired())
	<-pc.Done()
	_, err = a.WriteAt(blockdevtest.Fill(4, 4096), 0)
	require.ErrorIs(t, err, blockdevtest.ErrCrashed, "every device lost power")
	require.Equal(t, "power cut before the 2nd flush (call 5) on meta, policy drop(seed=0)", pc.String())

	after := pc.After()
	require.Len(t, after, 2)
	require.Equal(t, blockdevtest.Fill(1, 4096), blockdevtest.ReadAll(t, after[0])[:4096])
	require.Equal(t, -1, blockdevtest.FirstDiff(make([]byte, 64<<10-4096), blockdevtest.ReadAll(t, after[0])[4096:]), "the unflushed write is dropped")
	require.Equal(t, -1, blockdevtest.FirstDiff(make([]byte, 64<<10), blockdevtest.ReadAll(t, after[1])), "the flush never ran")
	require.Equal(t, 4096, after[0].BlockSize())
}

func TestPowerCutArmAndCut(t *testing.T) {
	pc := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, blockdevtest.Policy{Mode: blockdevtest.Keep})
	d := pc.NewDevice(t, "dev", 8192, 512)
	for range 3 {
		_, err := d.WriteAt(blockdevtest.Fill(7, 512), 0)
		require.NoError(t, err)
	}
	require.Equal(t, 3, pc.Calls(blockdevtest.OpWrite))
	pc.Arm(blockdevtest.OpWrite, 2) // the 5th write
	_, err := d.WriteAt(blockdevtest.Fill(8, 512), 512)
	require.NoError(t, err)
	_, err = d.WriteAt(blockdevtest.Fill(9, 512), 1024)
	require.ErrorIs(t, err, blockdevtest.ErrCrashed)
	require.Contains(t, pc.String(), "5th write (call 5) at 1024+512 on dev")
	img := blockdevtest.ReadAll(t, pc.Cut()[0])
	require.Equal(t, blockdevtest.Fill(8, 512), img[512:1024], "Keep keeps unflushed writes")
	require.Equal(t, make([]byte, 512), img[1024:1536], "the cut write never ran")

	pc2 := blockdevtest.NewPowerCut(blockdevtest.OpAny, 0, blockdevtest.Policy{Mode: blockdevtest.Drop})
	d2 := pc2.NewDevice(t, "dev", 8192, 512)
	require.Len(t, pc2.Cut(), 1)
	require.Equal(t, "power cut between calls (after 0), policy drop(seed=0)", pc2.String())
	require.ErrorIs(t, d2.Flush(), blockdevtest.ErrCrashed)
}

func TestSectorModel(t *testing.T) {
	const size = 8 * blockdevtest.SectorSize
	m := blockdevtest.NewSectorModel()
	m.Add("origin", make([]byte, size))
	m.Write("origin", 0, blockdevtest.Fill(1, 1024))
	m.Flush("origin")
	m.Snapshot("snap", "origin")
	m.Write("origin", 1024, blockdevtest.Fill(2, 512))
	m.Discard("origin", 0, 512)
	m.Failed("origin", 2048, 512, blockdevtest.Fill(3, 512))
	require.Equal(t, []string{"origin", "snap"}, m.Volumes())

	cur := append([]byte(nil), m.Current("origin")...)
	require.NoError(t, m.CheckRead("origin", 0, cur))
	withFailed := append([]byte(nil), cur...)
	copy(withFailed[2048:], blockdevtest.Fill(3, 512))
	require.NoError(t, m.CheckRead("origin", 0, withFailed), "a failed write may have landed")
	observed := blockdevtest.NewSectorModel()
	observed.Add("v", make([]byte, 1024))
	observed.Failed("v", 0, 1024, blockdevtest.Fill(4, 1024))
	seen := append(blockdevtest.Fill(4, 512), make([]byte, 512)...)
	require.NoError(t, observed.Observe("v", 0, seen))
	require.Equal(t, seen, observed.Current("v"), "a read settles what a failed write left")
	require.Error(t, observed.CheckRead("v", 0, make([]byte, 1024)), "and later reads must agree")
	bad := append([]byte(nil), cur...)
	bad[1024] = 9
	require.ErrorContains(t, m.CheckRead("origin", 0, bad), "sector 2")

	// After a crash: each sector written since the flush holds its flushed
	// value or one written since.
	crashed := make([]byte, size)
	copy(crashed, blockdevtest.Fill(1, 1024))
	copy(crashed[0:], make([]byte, 512))            // the discard survived
	copy(crashed[2048:], blockdevtest.Fill(3, 512)) // the failed write landed
	require.NoError(t, m.CheckCrash("origin", crashed, blockdevtest.Drop))
	lost := append([]byte(nil), crashed...)
	copy(lost[512:], make([]byte, 512))
	require.ErrorContains(t, m.CheckCrash("origin", lost, blockdevtest.Drop), "sector 1 (byte 512) lost its flushed data")
	never := append([]byte(nil), crashed...)
	copy(never[1024:], blockdevtest.Fill(5, 512))
	require.ErrorContains(t, m.CheckCrash("origin", never, blockdevtest.Keep), "never written there")
	require.NoError(t, m.CheckCrash("origin", never, blockdevtest.Tear), "a torn sector may hold anything")
	snap := append([]byte(nil), m.Current("snap")...)
	snap[0] = 0
	require.ErrorContains(t, m.CheckCrash("snap", snap, blockdevtest.Tear), "(a snapshot): sector 0 (byte 0) changed")

	// Verify: rule 4 first, then every volume; success makes the images durable.
	reads := map[string][]byte{"origin": crashed, "snap": m.Current("snap")}
	read := func(name string) ([]byte, error) { return reads[name], nil }
	boom := errors.New("boom")
	require.ErrorIs(t, m.Verify(blockdevtest.Drop, read, func() error { return boom }), boom)
	require.NoError(t, m.Verify(blockdevtest.Drop, read, nil))
	require.ErrorContains(t, m.CheckCrash("origin", cur, blockdevtest.Drop), "lost its flushed data", "the recovered image is durable now")
	m.Delete("snap")
	require.Equal(t, []string{"origin"}, m.Volumes())
}

func TestCheckLeaksPasses(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	done := make(chan struct{})
	go func() { <-done }()
	close(done)
}
