package nbd

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

func TestSpan(t *testing.T) {
	for _, tc := range []struct{ off, n, head, mid, tail int64 }{
		{0, 4096, 0, 4096, 0},
		{0, 8192, 0, 8192, 0},
		{0, 512, 512, 0, 0},
		{512, 512, 512, 0, 0},
		{512, 3584, 3584, 0, 0},
		{512, 4096, 3584, 0, 512},
		{100, 10000, 3996, 4096, 1908},
		{4095, 2, 1, 0, 1},
		{4096, 4097, 0, 4096, 1},
	} {
		h, m, tl := span(tc.off, tc.n, 4096)
		require.Equal(t, [3]int64{tc.head, tc.mid, tc.tail}, [3]int64{h, m, tl}, "off %d n %d", tc.off, tc.n)
		require.Equal(t, tc.n, h+m+tl)
	}
}

// Random requests of any alignment on a 4 KiB-block export, compared with
// a byte model after every step.
func TestSubBlockRandom(t *testing.T) {
	const size = 256 << 10
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 0))
	mem := blockdevtest.NewMem(t, size, 4096)
	r := cmdSession(t, mem, false, true)
	model := make([]byte, size)
	for step := range 400 {
		off := rng.Int64N(size)
		n := 1 + rng.Int64N(min(size-off, 3*4096))
		switch op := rng.IntN(10); {
		case op < 5:
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(rng.Uint32() | 1)
			}
			var flags uint16
			if op == 0 {
				flags = cflagFUA
			}
			require.Equal(t, Errno(0), r.errno(flags, cmdWrite, uint64(off), uint32(n), p), "step %d", step)
			copy(model[off:], p)
		case op < 7:
			got := r.readData(uint64(off), int(n), true)
			require.Equal(t, model[off:off+n], got, "step %d: read %d at %d", step, n, off)
		case op == 7:
			require.Equal(t, Errno(0), r.errno(0, cmdTrim, uint64(off), uint32(n), nil), "step %d", step)
			clear(model[off : off+n])
		default:
			flags := uint16(0)
			if op == 9 {
				flags = cflagNoHole
			}
			require.Equal(t, Errno(0), r.errno(flags, cmdWriteZeroes, uint64(off), uint32(n), nil), "step %d", step)
			clear(model[off : off+n])
		}
	}
	got := make([]byte, size)
	_, err := mem.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, model, got)
}

func TestSubBlockFastZero(t *testing.T) {
	r := cmdSession(t, blockdevtest.NewMem(t, cmdSize, 4096), false, true)
	require.Equal(t, ENOTSUP, r.errno(cflagFastZero, cmdWriteZeroes, 512, 4096, nil))
	require.Equal(t, Errno(0), r.errno(cflagFastZero, cmdWriteZeroes, 4096, 4096, nil))
}

// Block status of an unaligned range: descriptors start at the request's
// offset and end at its end; a partial block has its block's state.
func TestSubBlockBlockStatus(t *testing.T) {
	mem := blockdevtest.NewMem(t, cmdSize, 4096)
	_, err := mem.WriteAt(bytes.Repeat([]byte{1}, 4096), 4096)
	require.NoError(t, err)
	r := cmdSession(t, mem, false, true)
	c := r.roundTrip(0, cmdBlockStatus, 1000, 5000, nil)
	require.Equal(t, chunkBlockStatus, c.typ)
	var got [][2]uint32
	for b := c.payload[4:]; len(b) > 0; b = b[8:] {
		got = append(got, [2]uint32{be.Uint32(b), be.Uint32(b[4:])})
	}
	require.Equal(t, [][2]uint32{{4096 - 1000, stateHole | stateZero}, {6000 - 4096, 0}}, got)
	c = r.roundTrip(0, cmdBlockStatus, 4100, 10, nil)
	require.Equal(t, []uint32{10, 0}, []uint32{be.Uint32(c.payload[4:]), be.Uint32(c.payload[8:])})
}

// slowWrites delays every write of dev before it lands, which widens the
// window between a read-modify-write's read and its write: without the
// range lock, the concurrent tests below lose writes in every run.
func slowWrites(dev blockdev.Device) blockdev.Device {
	return blockdevtest.NewDelayed(dev, blockdevtest.DelayOptions{WriteLatency: 200 * time.Microsecond})
}

// sectorPattern is the content writer w gives sector s in round k.
func sectorPattern(w, k int) []byte {
	return bytes.Repeat([]byte{byte(1 + w*16 + k%16)}, 512)
}

// Eight writers, each on its own connection, write their own 512-byte
// sector of one 4 KiB block over and over: each is a read-modify-write of
// the same block, and no writer's last write may be lost.
func TestSubBlockConcurrentSectors(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	mem := blockdevtest.NewMem(t, 64<<10, 4096)
	ts := startServer(t, Options{}, Export{Name: "d", Device: slowWrites(mem)})
	const writers, rounds = 8, 50
	var g errgroup.Group
	for w := range writers {
		c := dial(t, ts.uri("d"))
		require.Equal(t, 512, c.BlockSize())
		g.Go(func() error {
			for k := range rounds {
				if _, err := c.WriteAt(sectorPattern(w, k), 4096+int64(w)*512); err != nil {
					return err
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	got := make([]byte, 4096)
	_, err := mem.ReadAt(got, 4096)
	require.NoError(t, err)
	for w := range writers {
		require.Equal(t, sectorPattern(w, rounds-1), got[w*512:(w+1)*512], "sector %d", w)
	}
}

// A whole-block write racing read-modify-writes of the same block is
// never undone by one of them. Only the whole-block writer writes sectors
// 0-6, so reading them back after its write must give what it wrote; a
// read-modify-write that read the block before the write and wrote it
// back after would bring the old bytes back.
func TestSubBlockWholeWriteNotLost(t *testing.T) {
	mem := blockdevtest.NewMem(t, 64<<10, 4096)
	ts := startServer(t, Options{}, Export{Name: "d", Device: slowWrites(mem)})
	whole, part := dial(t, ts.uri("d")), dial(t, ts.uri("d"))
	stop := make(chan struct{})
	var g errgroup.Group
	g.Go(func() error {
		defer close(stop)
		got := make([]byte, 3584)
		for k := range 300 {
			v := bytes.Repeat([]byte{byte(1 + k%250)}, 4096)
			if _, err := whole.WriteAt(v, 0); err != nil {
				return err
			}
			if _, err := whole.ReadAt(got, 0); err != nil {
				return err
			}
			if !bytes.Equal(got, v[:3584]) {
				return fmt.Errorf("round %d: whole-block write undone (read %#x, wrote %#x)", k, got[0], v[0])
			}
		}
		return nil
	})
	g.Go(func() error {
		p := bytes.Repeat([]byte{0xee}, 512)
		for {
			select {
			case <-stop:
				return nil
			default:
			}
			if _, err := part.WriteAt(p, 3584); err != nil {
				return err
			}
		}
	})
	require.NoError(t, g.Wait())
}

// The range lock itself: an exclusive holder keeps out overlapping
// holders of either kind, shared holders coexist, and disjoint ranges
// never wait.
func TestRangeLock(t *testing.T) {
	var l rangeLock
	a := l.lock(0, 4096, false)
	b := l.lock(0, 8192, false)    // shared with shared: no wait
	c := l.lock(8192, 12288, true) // disjoint: no wait
	got := make(chan uint64, 1)
	go func() {
		got <- l.lock(4096, 8192, true) // overlaps b only
	}()
	// Wait until the exclusive request is in and waiting: checking
	// before it has even asked would prove nothing.
	for deadline := time.Now().Add(time.Minute); ; {
		select {
		case <-got:
			t.Fatal("exclusive lock granted while a shared holder overlaps")
		default:
		}
		l.mu.Lock()
		waiting := l.waiting
		l.mu.Unlock()
		if waiting == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the exclusive request to wait")
		}
		runtime.Gosched()
	}
	// Releasing b lets it in; a and c, adjacent but disjoint, stay held.
	l.unlock(b)
	l.unlock(<-got)
	l.unlock(a)
	l.unlock(c)
	// Every entry is gone.
	l.mu.Lock()
	require.Empty(t, l.entries)
	l.mu.Unlock()
}

// libnbd in its default strict mode sends requests as small as the
// minimum block size the server advertises; eight 512-byte writes to one
// 4 KiB block, in flight together on each of four connections, all
// survive.
func TestSubBlockLibnbd(t *testing.T) {
	need(t, "python3")
	if _, err := runErr(t, "env", "PATH=/usr/bin:"+os.Getenv("PATH"), "python3", "-c", "import nbd"); err != nil {
		t.Skip("python3 nbd module (python3-libnbd) missing")
	}
	mem := blockdevtest.NewMem(t, 1<<20, 4096)
	ts := startServer(t, Options{}, Export{Name: "d", Device: slowWrites(mem)})
	script := `
import nbd, sys
uri = sys.argv[1]
hs = []
for c in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, h.get_block_size(nbd.SIZE_MINIMUM)
    hs.append(h)
for rnd in range(20):
    cookies = []
    for c, h in enumerate(hs):
        for s in range(8):
            if s % 4 != c:
                continue
            buf = bytes([1 + s * 16 + rnd % 16]) * 512
            cookies.append((h, h.aio_pwrite(buf, 8192 + s * 512)))
    for h, ck in cookies:
        while not h.aio_command_completed(ck):
            h.poll(-1)
# strict mode: unaligned by one byte is sent as is, and served
hs[0].pwrite(b"\xab" * 3, 8192 + 4096 + 1)
got = hs[0].pread(5, 8192 + 4096)
assert got == b"\x00\xab\xab\xab\x00", got
for h in hs:
    h.shutdown()
`
	out, err := runErr(t, "env", "PATH=/usr/bin:"+os.Getenv("PATH"), "python3", "-c", script, ts.uri("d"))
	require.NoError(t, err, out)
	got := make([]byte, 4096)
	_, err = mem.ReadAt(got, 8192)
	require.NoError(t, err)
	for s := range 8 {
		want := byte(1 + s*16 + 19%16)
		require.Equal(t, strings.Repeat(string([]byte{want}), 512), string(got[s*512:(s+1)*512]), "sector %d", s)
	}
}

// Our client sends 512-byte requests to a 4 KiB export from many
// goroutines on one connection; a reference model checks the result.
func TestSubBlockClientModel(t *testing.T) {
	const size = 128 << 10
	rng := rand.New(rand.NewPCG(blockdevtest.Seed(t), 1))
	mem := blockdevtest.NewMem(t, size, 4096)
	ts := startServer(t, Options{}, Export{Name: "d", Device: slowWrites(mem)})
	c := dial(t, ts.uri("d"))
	// Each goroutine owns every 8th sector, so the final content is
	// known whatever the interleaving.
	model := make([]byte, size)
	var g errgroup.Group
	for w := range 8 {
		seed := rng.Uint64()
		g.Go(func() error {
			r := rand.New(rand.NewPCG(seed, 0))
			for k := range 100 {
				s := int64(r.IntN(size/4096))*8 + int64(w)
				p := bytes.Repeat([]byte{byte(1 + w + 8*(k%30))}, 512)
				if _, err := c.WriteAt(p, s*512); err != nil {
					return fmt.Errorf("writer %d: %w", w, err)
				}
				copy(model[s*512:], p) // sectors are disjoint between writers
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	got := make([]byte, size)
	_, err := c.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, model, got)
}
