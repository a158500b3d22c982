// Package blockdevtest is the kit every blocksnap device and engine is
// tested with: Run, the conformance suite for the blockdev.Device contract
// (the testing/fstest idea); CrashSim, a device with a volatile write cache
// that can lose power; Faulty, which fails chosen calls; and Delayed, which
// adds latency and a bandwidth cap.
package blockdevtest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// MinSize is the smallest device Run accepts.
const MinSize = 256 << 10

// Run checks that the devices newDevice returns honour the blockdev.Device
// contract. newDevice is called once per subtest and must return a new, open
// device of at least MinSize bytes whose contents are arbitrary; Run closes
// it. A device whose first write fails with ErrReadOnly is checked as a
// read-only device.
func Run(t *testing.T, newDevice func(t *testing.T) blockdev.Device) {
	t.Helper()
	probe := newDevice(t)
	readOnly := isReadOnly(t, probe)
	_ = probe.Close()

	type test struct {
		name string
		fn   func(t *testing.T, d blockdev.Device)
	}
	common := []test{
		{"Geometry", testGeometry},
		{"Misaligned", testMisaligned},
		{"OutOfRange", testOutOfRange},
		{"ZeroLength", testZeroLength},
		{"ConcurrentReaders", testConcurrentReaders},
		{"Close", testClose},
	}
	writable := []test{
		{"WriteRead", testWriteRead},
		{"Overwrite", testOverwrite},
		{"LargeIO", testLargeIO},
		{"LastBlock", testLastBlock},
		{"Flush", testFlush},
		{"Discard", testDiscard},
		{"WriteFUA", testFUA},
		{"WriteZeroes", testWriteZeroes},
		{"ConcurrentDisjoint", testConcurrentDisjoint},
		{"RacingSameBlock", testRacingSameBlock},
		{"RandomModel", testRandomModel},
	}
	tests := common
	if readOnly {
		tests = append(tests, test{"ReadOnly", testReadOnly})
	} else {
		tests = append(tests, writable...)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t)
			if d.Size() < MinSize {
				t.Fatalf("device of %d bytes; the suite needs at least %d", d.Size(), MinSize)
			}
			defer func() { _ = d.Close() }()
			tc.fn(t, d)
		})
	}
}

func isReadOnly(t *testing.T, d blockdev.Device) bool {
	buf := make([]byte, d.BlockSize())
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatalf("probe read: %v", err)
	}
	_, err := d.WriteAt(buf, 0)
	if errors.Is(err, blockdev.ErrReadOnly) {
		return true
	}
	if err != nil {
		t.Fatalf("probe write: %v", err)
	}
	return false
}

func fatalIf(t *testing.T, err error, format string, args ...any) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", fmt.Sprintf(format, args...), err)
	}
}

func wantIs(t *testing.T, err, target error, what string) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: got error %v, want one wrapping %v", what, err, target)
	}
}

// pattern fills p with bytes derived from seed and the absolute offset, so a
// block read from the wrong place is noticed.
func pattern(p []byte, off int64, seed byte) {
	for i := range p {
		x := uint64(off+int64(i)) * 0x9E3779B1
		p[i] = byte(x>>24) ^ seed ^ byte(i>>9)
	}
}

func mustWrite(t *testing.T, d blockdev.Device, p []byte, off int64) {
	t.Helper()
	n, err := d.WriteAt(p, off)
	fatalIf(t, err, "write %d bytes at %d", len(p), off)
	if n != len(p) {
		t.Fatalf("write at %d: n=%d, want %d", off, n, len(p))
	}
}

func mustRead(t *testing.T, d blockdev.Device, n int, off int64) []byte {
	t.Helper()
	p := make([]byte, n)
	got, err := d.ReadAt(p, off)
	fatalIf(t, err, "read %d bytes at %d", n, off)
	if got != n {
		t.Fatalf("read at %d: n=%d, want %d", off, got, n)
	}
	return p
}

func expectBytes(t *testing.T, got, want []byte, off int64) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("data at %d differs from byte %d (absolute %d): got %#x want %#x", off, i, off+int64(i), got[i], want[i])
	}
}

func testGeometry(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	if bs != 512 && bs != 4096 {
		t.Fatalf("BlockSize %d, want 512 or 4096", bs)
	}
	if d.Size() <= 0 || d.Size()%int64(bs) != 0 {
		t.Fatalf("Size %d is not a positive multiple of the block size %d", d.Size(), bs)
	}
}

func testMisaligned(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	buf := make([]byte, 2*bs)
	for _, c := range []struct {
		off int64
		n   int
	}{{1, bs}, {int64(bs) / 2, bs}, {0, bs - 1}, {0, bs + 1}, {int64(bs), 1}} {
		_, err := d.ReadAt(buf[:c.n], c.off)
		wantIs(t, err, blockdev.ErrMisaligned, fmt.Sprintf("read %d at %d", c.n, c.off))
		_, err = d.WriteAt(buf[:c.n], c.off)
		if !errors.Is(err, blockdev.ErrReadOnly) {
			wantIs(t, err, blockdev.ErrMisaligned, fmt.Sprintf("write %d at %d", c.n, c.off))
		}
		err = d.Discard(c.off, int64(c.n))
		if !errors.Is(err, blockdev.ErrReadOnly) {
			wantIs(t, err, blockdev.ErrMisaligned, fmt.Sprintf("discard %d at %d", c.n, c.off))
		}
	}
}

func testOutOfRange(t *testing.T, d blockdev.Device) {
	bs := int64(d.BlockSize())
	size := d.Size()
	buf := make([]byte, 2*bs)
	for _, c := range []struct {
		off int64
		n   int64
	}{{size, bs}, {size - bs, 2 * bs}, {-bs, bs}, {size + 100*bs, bs}, {1 << 62, bs}} {
		_, err := d.ReadAt(buf[:c.n], c.off)
		wantIs(t, err, blockdev.ErrOutOfRange, fmt.Sprintf("read %d at %d", c.n, c.off))
		_, err = d.WriteAt(buf[:c.n], c.off)
		if !errors.Is(err, blockdev.ErrReadOnly) {
			wantIs(t, err, blockdev.ErrOutOfRange, fmt.Sprintf("write %d at %d", c.n, c.off))
		}
		err = d.Discard(c.off, c.n)
		if !errors.Is(err, blockdev.ErrReadOnly) {
			wantIs(t, err, blockdev.ErrOutOfRange, fmt.Sprintf("discard %d at %d", c.n, c.off))
		}
	}
	err := d.Discard(0, size+bs)
	if !errors.Is(err, blockdev.ErrReadOnly) {
		wantIs(t, err, blockdev.ErrOutOfRange, "discard past the end")
	}
}

func testZeroLength(t *testing.T, d blockdev.Device) {
	for _, off := range []int64{0, int64(d.BlockSize()), d.Size()} {
		n, err := d.ReadAt(nil, off)
		fatalIf(t, err, "zero-length read at %d", off)
		if n != 0 {
			t.Fatalf("zero-length read returned n=%d", n)
		}
	}
}

func testWriteRead(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	for i, c := range []struct {
		off    int64
		blocks int
	}{{0, 1}, {int64(bs), 3}, {int64(17 * bs), 8}, {64 << 10, 16}, {d.Size() / 2, 5}} {
		off := c.off - c.off%int64(bs)
		p := make([]byte, c.blocks*bs)
		pattern(p, off, byte(i+1))
		mustWrite(t, d, p, off)
		expectBytes(t, mustRead(t, d, len(p), off), p, off)
	}
	// Reads of sub-ranges of a larger write see the right part of it.
	big := make([]byte, 16*bs)
	pattern(big, 0, 0x5a)
	mustWrite(t, d, big, 0)
	for _, b := range []int{0, 1, 7, 15} {
		expectBytes(t, mustRead(t, d, bs, int64(b*bs)), big[b*bs:(b+1)*bs], int64(b*bs))
	}
}

func testOverwrite(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	p := make([]byte, 8*bs)
	pattern(p, 0, 1)
	mustWrite(t, d, p, 0)
	q := make([]byte, 2*bs)
	pattern(q, int64(3*bs), 2)
	mustWrite(t, d, q, int64(3*bs))
	copy(p[3*bs:], q)
	expectBytes(t, mustRead(t, d, len(p), 0), p, 0)
}

func testLargeIO(t *testing.T, d blockdev.Device) {
	n := min(int64(4<<20), d.Size()/2)
	n -= n % int64(d.BlockSize())
	p := make([]byte, n)
	pattern(p, int64(d.BlockSize()), 3)
	mustWrite(t, d, p, int64(d.BlockSize()))
	expectBytes(t, mustRead(t, d, len(p), int64(d.BlockSize())), p, int64(d.BlockSize()))
}

func testLastBlock(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	off := d.Size() - int64(bs)
	p := make([]byte, bs)
	pattern(p, off, 4)
	mustWrite(t, d, p, off)
	expectBytes(t, mustRead(t, d, bs, off), p, off)
}

func testFlush(t *testing.T, d blockdev.Device) {
	fatalIf(t, d.Flush(), "flush of an idle device")
	p := make([]byte, 4*d.BlockSize())
	pattern(p, 0, 5)
	mustWrite(t, d, p, 0)
	fatalIf(t, d.Flush(), "flush")
	expectBytes(t, mustRead(t, d, len(p), 0), p, 0)
}

func testDiscard(t *testing.T, d blockdev.Device) {
	bs := int64(d.BlockSize())
	// A range large enough to cover whole allocation units (chunks of 64 KiB
	// up to 1 MiB) plus ragged edges.
	n := min(int64(3<<20), d.Size()/2)
	n -= n % bs
	p := make([]byte, n)
	pattern(p, 0, 6)
	mustWrite(t, d, p, 0)
	cases := []struct{ off, n int64 }{{bs, bs}, {5 * bs, 3 * bs}, {64 << 10, min(1<<20, n-(64<<10)-bs)}}
	for _, c := range cases {
		c.n -= c.n % bs
		fatalIf(t, d.Discard(c.off, c.n), "discard %d at %d", c.n, c.off)
		clear(p[c.off : c.off+c.n])
	}
	expectBytes(t, mustRead(t, d, len(p), 0), p, 0)
	fatalIf(t, d.Discard(0, 0), "zero-length discard")
	// The whole device.
	fatalIf(t, d.Discard(0, d.Size()), "discard of the whole device")
	got := mustRead(t, d, int(min(d.Size(), 4<<20)), 0)
	if !blockdev.IsZero(got) {
		t.Fatal("device does not read as zeros after a discard of all of it")
	}
}

func testFUA(t *testing.T, d blockdev.Device) {
	p := make([]byte, 2*d.BlockSize())
	pattern(p, 0, 7)
	n, err := blockdev.WriteFUA(d, p, int64(d.BlockSize()))
	fatalIf(t, err, "FUA write")
	if n != len(p) {
		t.Fatalf("FUA write n=%d", n)
	}
	expectBytes(t, mustRead(t, d, len(p), int64(d.BlockSize())), p, int64(d.BlockSize()))
}

func testWriteZeroes(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	p := make([]byte, 32*bs)
	pattern(p, 0, 8)
	mustWrite(t, d, p, 0)
	fatalIf(t, blockdev.WriteZeroes(d, int64(2*bs), int64(20*bs)), "write zeroes")
	clear(p[2*bs : 22*bs])
	expectBytes(t, mustRead(t, d, len(p), 0), p, 0)
	if z, ok := d.(blockdev.ZeroWriter); ok {
		wantIs(t, z.WriteZeroes(1, int64(bs)), blockdev.ErrMisaligned, "misaligned write zeroes")
		wantIs(t, z.WriteZeroes(d.Size(), int64(bs)), blockdev.ErrOutOfRange, "write zeroes past the end")
	}
}

func testConcurrentDisjoint(t *testing.T, d blockdev.Device) {
	const workers = 8
	bs := d.BlockSize()
	span := min(d.Size()/workers, 256<<10)
	span -= span % int64(bs)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := int64(w) * span
			p := make([]byte, bs)
			for i := int64(0); i < span; i += int64(bs) {
				pattern(p, base+i, byte(w))
				if _, err := d.WriteAt(p, base+i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent write: %v", err)
	}
	for w := range workers {
		base := int64(w) * span
		want := make([]byte, bs)
		got := mustRead(t, d, int(span), base)
		for i := int64(0); i < span; i += int64(bs) {
			pattern(want, base+i, byte(w))
			expectBytes(t, got[i:i+int64(bs)], want, base+i)
		}
	}
}

// uniform reports whether every byte of p equals p[0].
func uniform(p []byte) bool {
	for _, b := range p {
		if b != p[0] {
			return false
		}
	}
	return true
}

func testRacingSameBlock(t *testing.T, d blockdev.Device) {
	const writers, rounds = 6, 50
	bs := d.BlockSize()
	off := int64(3 * bs)
	mustWrite(t, d, bytes.Repeat([]byte{0xee}, 2*bs), off)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(w + 1)}, 2*bs)
			for range rounds {
				if _, err := d.WriteAt(p, off); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := mustRead(t, d, 2*bs, off)
	for b := 0; b < 2; b++ {
		blk := got[b*bs : (b+1)*bs]
		if !uniform(blk) || blk[0] == 0 || blk[0] > writers {
			t.Fatalf("block %d after racing writers is not one writer's data (first byte %#x)", b, blk[0])
		}
	}
}

func testConcurrentReaders(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	want := mustRead(t, d, 64*bs, 0)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for r := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, bs)
			for i := range 64 {
				b := (i*7 + r) % 64
				if _, err := d.ReadAt(p, int64(b*bs)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[b*bs:(b+1)*bs]) {
					errs <- fmt.Errorf("concurrent read of block %d differs", b)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func testReadOnly(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	before := mustRead(t, d, 4*bs, 0)
	p := bytes.Repeat([]byte{0x77}, 4*bs)
	_, err := d.WriteAt(p, 0)
	wantIs(t, err, blockdev.ErrReadOnly, "write to a read-only device")
	wantIs(t, d.Discard(0, int64(bs)), blockdev.ErrReadOnly, "discard on a read-only device")
	if f, ok := d.(blockdev.FUAWriter); ok {
		_, err := f.WriteAtFUA(p, 0)
		wantIs(t, err, blockdev.ErrReadOnly, "FUA write to a read-only device")
	}
	if z, ok := d.(blockdev.ZeroWriter); ok {
		wantIs(t, z.WriteZeroes(0, int64(bs)), blockdev.ErrReadOnly, "write zeroes to a read-only device")
	}
	expectBytes(t, mustRead(t, d, 4*bs, 0), before, 0)
}

func testClose(t *testing.T, d blockdev.Device) {
	bs := d.BlockSize()
	fatalIf(t, d.Close(), "close")
	p := make([]byte, bs)
	_, err := d.ReadAt(p, 0)
	wantIs(t, err, blockdev.ErrClosed, "read after close")
	_, err = d.WriteAt(p, 0)
	wantIs(t, err, blockdev.ErrClosed, "write after close")
	wantIs(t, d.Flush(), blockdev.ErrClosed, "flush after close")
	wantIs(t, d.Discard(0, int64(bs)), blockdev.ErrClosed, "discard after close")
	if err := d.Close(); err != nil {
		wantIs(t, err, blockdev.ErrClosed, "second close")
	}
}

// testRandomModel runs a random mix of writes, reads, discards and flushes
// within a window of the device and compares every read with a model.
func testRandomModel(t *testing.T, d blockdev.Device) {
	seed := Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	bs := int64(d.BlockSize())
	window := min(d.Size(), 2<<20)
	window -= window % bs
	model := mustRead(t, d, int(window), 0)
	blocks := window / bs
	for i := range 400 {
		off := rng.Int64N(blocks) * bs
		n := (1 + rng.Int64N(min(32, blocks-off/bs))) * bs
		switch op := rng.IntN(10); {
		case op < 5:
			p := make([]byte, n)
			pattern(p, off, byte(i))
			mustWrite(t, d, p, off)
			copy(model[off:], p)
		case op < 8:
			expectBytes(t, mustRead(t, d, int(n), off), model[off:off+n], off)
		case op < 9:
			fatalIf(t, d.Discard(off, n), "discard %d at %d (seed %d)", n, off, seed)
			clear(model[off : off+n])
		default:
			fatalIf(t, d.Flush(), "flush (seed %d)", seed)
		}
	}
	expectBytes(t, mustRead(t, d, int(window), 0), model, 0)
}
