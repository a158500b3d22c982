package clone

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

type modelConfig struct {
	name      string
	size      int64
	srcBS     int
	dstBS     int
	opts      Options
	steps     int
	bgHydrate bool // let background hydration run too (nondeterministic timing, same model)
}

var modelConfigs = []modelConfig{
	{name: "region4k", size: 512 << 10, srcBS: 4096, dstBS: 4096, opts: Options{RegionSize: 4 << 10}, steps: 300},
	{name: "region16k-512", size: 1<<20 - 8192, srcBS: 512, dstBS: 512, opts: Options{RegionSize: 16 << 10, BatchSize: 3}, steps: 300},
	{name: "region64k-mixed", size: 2 << 20, srcBS: 512, dstBS: 4096, opts: Options{RegionSize: 64 << 10, NoDiscardPassdown: true}, steps: 300},
	{name: "hydrate-on-read", size: 1 << 20, srcBS: 4096, dstBS: 4096, opts: Options{RegionSize: 32 << 10, HydrateOnRead: true}, steps: 300},
	{name: "nosync", size: 1 << 20, srcBS: 4096, dstBS: 4096, opts: Options{RegionSize: 16 << 10, NoMetadataSync: true}, steps: 300},
	{name: "background", size: 2 << 20, srcBS: 4096, dstBS: 4096, opts: Options{RegionSize: 16 << 10, BatchSize: 4, HydrationThreshold: 8}, steps: 300, bgHydrate: true},
}

// TestModel runs a random workload against a clone and a plain byte slice
// and compares them after every step: reads, writes of every alignment
// (whole regions, partial, spanning; hydrated or not), discards, flushes,
// hydration steps and close/reopen. It also checks, after every step, that
// every hydrated region's destination data is the model's.
func TestModel(t *testing.T) {
	for _, cfg := range modelConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			blockdevtest.CheckLeaks(t)
			runModel(t, cfg, blockdevtest.Seed(t))
		})
	}
}

type modelRun struct {
	t     *testing.T
	cfg   modelConfig
	seed  uint64
	rng   *rand.Rand
	src   *blockdev.Mem
	dst   *blockdev.Mem
	meta  *blockdev.Mem
	c     *Clone
	model []byte
	rs    int64
	bs    int64
	step  int
}

func runModel(t *testing.T, cfg modelConfig, seed uint64) {
	m := &modelRun{t: t, cfg: cfg, seed: seed, rng: rand.New(rand.NewPCG(seed, 7))}
	var img []byte
	m.src, img = newSource(t, cfg.size, cfg.srcBS)
	m.model = img
	m.dst = blockdevtest.NewMem(t, cfg.size, cfg.dstBS)
	// A destination holding garbage: nothing may read it before it is
	// written or discarded.
	junk := bytes.Repeat([]byte{0xee}, int(cfg.size))
	_, err := m.dst.WriteAt(junk, 0)
	require.NoError(t, err)
	m.meta = blockdevtest.NewMem(t, MetadataSize(cfg.size, cfg.opts.RegionSize), 4096)
	opts := cfg.opts
	opts.NoHydration = !cfg.bgHydrate
	opts.CommitInterval = -1
	m.c, err = Create(m.src, m.dst, m.meta, opts)
	require.NoError(t, err)
	defer func() { _ = m.c.Close() }()
	m.rs = m.c.RegionSize()
	m.bs = int64(m.c.BlockSize())
	steps := cfg.steps
	if raceEnabled {
		steps /= 6
	}
	for m.step = 0; m.step < steps; m.step++ {
		m.doStep()
		m.verify()
	}
	m.reopen()
	m.verify()
}

func (m *modelRun) failf(format string, args ...any) string {
	return fmt.Sprintf("seed %d step %d: ", m.seed, m.step) + fmt.Sprintf(format, args...)
}

// randRange picks a block-aligned range in one of the alignment cases.
func (m *modelRun) randRange() (off, n int64, kind string) {
	regions := (m.cfg.size + m.rs - 1) / m.rs
	r := m.rng.Int64N(regions)
	start := r * m.rs
	rEnd := min(start+m.rs, m.cfg.size)
	blocks := func(lo, hi int64) int64 { return lo + m.rng.Int64N((hi-lo)/m.bs+1)*m.bs }
	switch k := m.rng.IntN(5); k {
	case 0: // whole regions
		k := 1 + m.rng.Int64N(3)
		return start, min(start+k*m.rs, m.cfg.size) - start, "whole"
	case 1: // partial, inside one region
		if rEnd-start <= m.bs {
			return start, rEnd - start, "whole"
		}
		lo := blocks(start, rEnd-m.bs)
		hi := blocks(lo+m.bs, rEnd)
		if hi <= lo {
			hi = lo + m.bs
		}
		return lo, hi - lo, "partial"
	case 2: // spanning: partial head, whole middle, partial tail
		lo := blocks(start, rEnd-m.bs)
		end := min(rEnd+m.rng.Int64N(3)*m.rs+m.bs*(1+m.rng.Int64N(m.rs/m.bs)), m.cfg.size)
		end -= end % m.bs
		if end <= lo {
			end = lo + m.bs
		}
		return lo, end - lo, "spanning"
	case 3: // one block
		return blocks(start, rEnd-m.bs), m.bs, "block"
	default: // the last region, possibly short
		last := (regions - 1) * m.rs
		return last, m.cfg.size - last, "last"
	}
}

func (m *modelRun) doStep() {
	t, c := m.t, m.c
	switch op := m.rng.IntN(100); {
	case op < 30: // write
		off, n, kind := m.randRange()
		p := make([]byte, n)
		fillPattern(p, off, byte(m.step))
		_, err := c.WriteAt(p, off)
		require.NoError(t, err, m.failf("write %s %d+%d", kind, off, n))
		copy(m.model[off:], p)
		r0, r1 := c.regionsOf(off, n)
		require.True(t, c.md.rangeHydrated(r0, r1), m.failf("write %s %d+%d left regions unhydrated", kind, off, n))
	case op < 50: // read
		off, n, kind := m.randRange()
		p := make([]byte, n)
		_, err := c.ReadAt(p, off)
		require.NoError(t, err, m.failf("read %s %d+%d", kind, off, n))
		require.True(t, bytes.Equal(p, m.model[off:off+n]), m.failf("read %s %d+%d differs", kind, off, n))
	case op < 60: // discard
		off, n, kind := m.randRange()
		require.NoError(t, c.Discard(off, n), m.failf("discard %s %d+%d", kind, off, n))
		clear(m.model[off : off+n])
	case op < 68: // FUA write
		off, n, _ := m.randRange()
		p := make([]byte, n)
		fillPattern(p, off, byte(m.step)^0x80)
		_, err := c.WriteAtFUA(p, off)
		require.NoError(t, err, m.failf("FUA write %d+%d", off, n))
		copy(m.model[off:], p)
	case op < 78:
		require.NoError(t, c.Flush(), m.failf("flush"))
	case op < 93: // hydration step
		_, err := c.hyd.step(context.Background(), uint64(1+m.rng.IntN(4)))
		require.NoError(t, err, m.failf("hydration step"))
	case op < 97:
		m.reopen()
	default:
		require.NoError(t, c.Check(), m.failf("check"))
	}
}

// verify compares the whole clone with the model, and every hydrated
// region of the destination with the model.
func (m *modelRun) verify() {
	t, c := m.t, m.c
	got := make([]byte, m.cfg.size)
	_, err := c.ReadAt(got, 0)
	require.NoError(t, err, m.failf("full read"))
	if !bytes.Equal(got, m.model) {
		i := 0
		for got[i] == m.model[i] {
			i++
		}
		t.Fatal(m.failf("clone differs from the model at byte %d (region %d)", i, int64(i)/m.rs))
	}
	// Which regions are hydrated, before reading the destination: with
	// background hydration running, a region hydrated after the read would
	// be compared with stale data.
	hydrated := make([]bool, c.geo.Regions)
	for r := range hydrated {
		hydrated[r] = c.md.test(uint64(r))
	}
	d := make([]byte, m.cfg.size)
	_, err = m.dst.ReadAt(d, 0)
	require.NoError(t, err)
	for r := uint64(0); r < c.geo.Regions; r++ {
		lo, hi := c.regionStart(r), c.regionEnd(r)
		if hydrated[r] && !bytes.Equal(d[lo:hi], m.model[lo:hi]) {
			t.Fatal(m.failf("hydrated region %d: destination differs from the model", r))
		}
	}
}

func (m *modelRun) reopen() {
	t := m.t
	before := m.c.Status().Hydrated
	require.NoError(t, m.c.Close(), m.failf("close"))
	opts := m.cfg.opts
	opts.NoHydration = !m.cfg.bgHydrate
	opts.CommitInterval = -1
	var err error
	m.c, err = Open(m.src, m.dst, m.meta, opts)
	require.NoError(t, err, m.failf("reopen"))
	require.NoError(t, m.c.Check(), m.failf("check after reopen"))
	require.GreaterOrEqual(t, m.c.Status().Hydrated, before, m.failf("reopen lost hydrated regions"))
}
