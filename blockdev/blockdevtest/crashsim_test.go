package blockdevtest_test

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func TestConformanceCrashSim(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		return blockdevtest.MustCrashSim(4<<20, 512)
	})
}

func TestConformanceFaulty(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		m, err := blockdev.NewMem(4<<20, 4096)
		require.NoError(t, err)
		return blockdevtest.NewFaulty(m)
	})
}

func TestConformanceDelayed(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		m, err := blockdev.NewMem(4<<20, 4096)
		require.NoError(t, err)
		return blockdevtest.NewDelayed(m, blockdevtest.DelayOptions{ReadLatency: time.Microsecond})
	})
}

func read(t *testing.T, d blockdev.Device, off int64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	_, err := d.ReadAt(p, off)
	require.NoError(t, err)
	return p
}

// setup writes A everywhere in [0, 64 KiB) and flushes, then writes B over
// [0, 32 KiB) and discards [32 KiB, 48 KiB), both unflushed.
func setup(t *testing.T) *blockdevtest.CrashSim {
	s := blockdevtest.MustCrashSim(1<<20, 512)
	_, err := s.WriteAt(blockdevtest.Fill('A', 64<<10), 0)
	require.NoError(t, err)
	require.NoError(t, s.Flush())
	_, err = s.WriteAt(blockdevtest.Fill('B', 32<<10), 0)
	require.NoError(t, err)
	require.NoError(t, s.Discard(32<<10, 16<<10))
	require.Equal(t, 2, s.Pending())
	// Before a crash, reads see everything.
	require.Equal(t, blockdevtest.Fill('B', 32<<10), read(t, s, 0, 32<<10))
	require.Equal(t, blockdevtest.Fill(0, 16<<10), read(t, s, 32<<10, 16<<10))
	return s
}

func TestCrashDropKeepsOnlyFlushed(t *testing.T) {
	s := setup(t)
	c := s.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	require.Equal(t, blockdevtest.Fill('A', 64<<10), read(t, c, 0, 64<<10))
	require.Equal(t, 0, c.Pending())
}

func TestCrashKeepKeepsEverything(t *testing.T) {
	s := setup(t)
	c := s.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Keep})
	require.Equal(t, blockdevtest.Fill('B', 32<<10), read(t, c, 0, 32<<10))
	require.Equal(t, blockdevtest.Fill(0, 16<<10), read(t, c, 32<<10, 16<<10))
	require.Equal(t, blockdevtest.Fill('A', 16<<10), read(t, c, 48<<10, 16<<10))
}

// classify counts, over the 96 sectors setup's unflushed ops touched, those
// still holding the flushed data (old), those holding the unflushed data
// (kept: B for the write, zeros for the discard) and the rest (garbage).
func classify(img []byte) (old, kept, garbage int) {
	for sec := 0; sec < 96; sec++ {
		b := img[sec*512 : (sec+1)*512]
		newVal := byte('B')
		if sec >= 64 {
			newVal = 0
		}
		switch {
		case bytes.Equal(b, blockdevtest.Fill(newVal, 512)):
			kept++
		case bytes.Equal(b, blockdevtest.Fill('A', 512)):
			old++
		default:
			garbage++
		}
	}
	return old, kept, garbage
}

// Each sector is either old or new, never anything else; with p=0.5 over
// 96 sectors both outcomes occur; p=0 and p=1 are Drop and Keep.
func TestCrashKeepSomePerSector(t *testing.T) {
	for _, p := range []float64{0, 0.5, 1} {
		s := setup(t)
		c := s.MustCrash(blockdevtest.Policy{Mode: blockdevtest.KeepSome, P: p, Seed: 42})
		img := read(t, c, 0, 64<<10)
		lost, kept, garbage := classify(img)
		require.Zero(t, garbage, "p=%v: a sector is neither old nor new", p)
		require.Equal(t, blockdevtest.Fill('A', 16<<10), img[48<<10:], "untouched sectors keep flushed data")
		switch p {
		case 0:
			require.Equal(t, 0, kept)
		case 1:
			require.Equal(t, 0, lost)
		default:
			require.Positive(t, kept)
			require.Positive(t, lost)
		}
	}
}

// The same seed gives the same image.
func TestCrashDeterministic(t *testing.T) {
	for _, mode := range []blockdevtest.Mode{blockdevtest.KeepSome, blockdevtest.Tear} {
		a := setup(t).MustCrash(blockdevtest.Policy{Mode: mode, P: 0.3, Seed: 7})
		b := setup(t).MustCrash(blockdevtest.Policy{Mode: mode, P: 0.3, Seed: 7})
		require.Equal(t, read(t, a, 0, 1<<20), read(t, b, 0, 1<<20), mode.String())
	}
}

// Tear: each unflushed sector is old, new or garbage; flushed data is never
// touched; with 96 sectors all three outcomes occur.
func TestCrashTear(t *testing.T) {
	s := setup(t)
	c := s.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Tear, Seed: 3})
	img := read(t, c, 0, 64<<10)
	old, kept, garbage := classify(img)
	require.Positive(t, old)
	require.Positive(t, kept)
	require.Positive(t, garbage)
	require.Equal(t, blockdevtest.Fill('A', 16<<10), img[48<<10:])
}

func TestCrashedDeviceFails(t *testing.T) {
	s := setup(t)
	_ = s.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	_, err := s.ReadAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, blockdevtest.ErrCrashed)
	require.ErrorIs(t, err, blockdev.ErrIO)
	_, err = s.WriteAt(make([]byte, 512), 0)
	require.ErrorIs(t, err, blockdevtest.ErrCrashed)
	require.ErrorIs(t, s.Flush(), blockdevtest.ErrCrashed)
	_, err = s.Crash(blockdevtest.Policy{})
	require.Error(t, err)
	// Geometry stays available: engines ask for it while shutting down.
	require.Equal(t, int64(1<<20), s.Size())
	require.Equal(t, 512, s.BlockSize())
}

// A flushed write survives every policy; a chain of crashes keeps working.
func TestCrashChainAllPolicies(t *testing.T) {
	s := blockdevtest.MustCrashSim(256<<10, 4096)
	for i, p := range blockdevtest.AllPolicies(9) {
		_, err := s.WriteAt(blockdevtest.Fill(byte('a'+i), 4096), int64(i)*4096)
		require.NoError(t, err)
		require.NoError(t, s.Flush())
		_, err = s.WriteAt(blockdevtest.Fill('z', 4096), 128<<10)
		require.NoError(t, err)
		s = s.MustCrash(p)
		for j := 0; j <= i; j++ {
			require.Equal(t, blockdevtest.Fill(byte('a'+j), 4096), read(t, s, int64(j)*4096, 4096), "policy %v block %d", p, j)
		}
	}
}

func TestCrashAll(t *testing.T) {
	a := blockdevtest.MustCrashSim(256<<10, 512)
	b := blockdevtest.MustCrashSim(256<<10, 512)
	_, err := a.WriteAt(blockdevtest.Fill(1, 512), 0)
	require.NoError(t, err)
	require.NoError(t, a.Flush())
	_, err = b.WriteAt(blockdevtest.Fill(2, 512), 0)
	require.NoError(t, err)
	out, err := blockdevtest.CrashAll(blockdevtest.Policy{Mode: blockdevtest.Drop}, a, b)
	require.NoError(t, err)
	require.Equal(t, blockdevtest.Fill(1, 512), read(t, out[0], 0, 512))
	require.Equal(t, blockdevtest.Fill(0, 512), read(t, out[1], 0, 512))
}

func TestFaultyNth(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	f := blockdevtest.NewFaulty(m)
	f.FailNth(blockdevtest.OpWrite, 2, blockdev.ErrIO)
	_, err = f.WriteAt(blockdevtest.Fill(1, 512), 0)
	require.NoError(t, err)
	_, err = f.WriteAt(blockdevtest.Fill(2, 512), 0)
	require.ErrorIs(t, err, blockdev.ErrIO)
	require.Equal(t, blockdevtest.Fill(1, 512), read(t, m, 0, 512), "a failed write does not touch the device")
	_, err = f.WriteAt(blockdevtest.Fill(3, 512), 0)
	require.NoError(t, err)
	require.Equal(t, 1, f.Injected())
	require.Equal(t, 3, f.Calls())
}

func TestFaultyFromAndWhen(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	f := blockdevtest.NewFaulty(m)
	f.FailFrom(blockdevtest.OpAny, 3, blockdev.ErrIO)
	require.NoError(t, f.Flush())
	require.NoError(t, f.Flush())
	require.Error(t, f.Flush())
	_, err = f.ReadAt(make([]byte, 512), 0)
	require.Error(t, err)
	f.Clear()
	require.NoError(t, f.Flush())
	boom := errors.New("boom")
	f.FailWhen(func(c blockdevtest.Call) error {
		if c.Op == blockdevtest.OpDiscard && c.Off == 4096 {
			return boom
		}
		return nil
	})
	require.NoError(t, f.Discard(0, 512))
	require.ErrorIs(t, f.Discard(4096, 512), boom)
}

func TestDelayedBandwidth(t *testing.T) {
	m, err := blockdev.NewMem(1<<20, 4096)
	require.NoError(t, err)
	d := blockdevtest.NewDelayed(m, blockdevtest.DelayOptions{BytesPerSecond: 8 << 20})
	start := time.Now()
	_, err = d.ReadAt(make([]byte, 256<<10), 0) // 1/32 s at 8 MiB/s
	require.NoError(t, err)
	// A lower bound only: sleeping can take longer on a busy machine, never less.
	require.GreaterOrEqual(t, time.Since(start), 30*time.Millisecond)
}
