package metamorphic

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"strings"

	"github.com/blocksnap/blocksnap/blockdev"
)

// opKind is what one step of the stream does.
type opKind uint8

const (
	opWrite opKind = iota
	opFUA          // a write with FUA (blockdev.WriteFUA)
	opFlush
	opDiscard
	opZeroes // blockdev.WriteZeroes
	opRead
)

func (k opKind) String() string {
	return [...]string{"write", "write-fua", "flush", "discard", "write-zeroes", "read"}[k]
}

// op is one step. Writes carry a pattern derived from val and the absolute
// offset, so data landing in the wrong place shows.
type op struct {
	kind   opKind
	off, n int64
	val    byte
}

func (o op) String() string {
	switch o.kind {
	case opFlush:
		return "flush"
	case opWrite, opFUA:
		return fmt.Sprintf("%s %d+%d val=%#02x", o.kind, o.off, o.n, o.val)
	}
	return fmt.Sprintf("%s %d+%d", o.kind, o.off, o.n)
}

// pattern fills p with the bytes a write of val at off carries.
func pattern(p []byte, off int64, val byte) {
	for i := range p {
		x := uint64(off+int64(i)) * 0x9E3779B97F4A7C15
		p[i] = byte(x>>56) ^ val
	}
}

// genOps draws a stream of n operations on a device of size bytes and block
// size bs. Ranges favour a few hot spots so writes overlap, and are up to 16
// blocks long so they cross chunk and region boundaries.
func genOps(rng *rand.Rand, n int, size int64, bs int) []op {
	blocks := size / int64(bs)
	hot := []int64{0, blocks / 3, blocks - 1}
	span := func() (int64, int64) {
		var b int64
		if rng.IntN(3) == 0 {
			b = hot[rng.IntN(len(hot))] + rng.Int64N(8) - 4
		} else {
			b = rng.Int64N(blocks)
		}
		b = min(max(b, 0), blocks-1)
		k := 1 + rng.Int64N(min(16, blocks-b))
		return b * int64(bs), k * int64(bs)
	}
	ops := make([]op, 0, n)
	for range n {
		var o op
		switch r := rng.IntN(100); {
		case r < 35:
			o.kind = opWrite
		case r < 40:
			o.kind = opFUA
		case r < 47:
			o.kind = opFlush
		case r < 55:
			o.kind = opDiscard
		case r < 62:
			o.kind = opZeroes
		default:
			o.kind = opRead
		}
		if o.kind != opFlush {
			o.off, o.n = span()
		}
		o.val = byte(rng.Uint32())
		ops = append(ops, o)
	}
	// The stream ends by reading the whole device.
	for off := int64(0); off < size; off += maxIO {
		ops = append(ops, op{kind: opRead, off: off, n: min(maxIO, size-off)})
	}
	return ops
}

// maxIO is the longest operation in a stream.
const maxIO = 16 * 4096

// history is what a stream's reads returned: a hash of each read's bytes,
// in order, and the index in the stream of the op that produced each.
type history struct {
	sums []uint64
	at   []int
}

// run applies ops to d and records the reads; a failed call ends the run
// with an error naming the op.
func run(d blockdev.Device, ops []op) (history, error) {
	var h history
	buf := make([]byte, maxIO)
	for i, o := range ops {
		p := buf[:o.n]
		var err error
		switch o.kind {
		case opWrite, opFUA:
			pattern(p, o.off, o.val)
			if o.kind == opFUA {
				_, err = blockdev.WriteFUA(d, p, o.off)
			} else {
				_, err = d.WriteAt(p, o.off)
			}
		case opFlush:
			err = d.Flush()
		case opDiscard:
			err = d.Discard(o.off, o.n)
		case opZeroes:
			err = blockdev.WriteZeroes(d, o.off, o.n)
		case opRead:
			if _, err = d.ReadAt(p, o.off); err == nil {
				h.sums = append(h.sums, sum(p))
				h.at = append(h.at, i)
			}
		}
		if err != nil {
			return h, fmt.Errorf("op %d (%v): %w", i, o, err)
		}
	}
	return h, nil
}

func sum(p []byte) uint64 {
	f := fnv.New64a()
	f.Write(p)
	return f.Sum64()
}

// diverge returns the index in the stream of the first read whose result
// differs between want and got, or -1.
func diverge(want, got history) int {
	for i := range min(len(want.sums), len(got.sums)) {
		if want.sums[i] != got.sums[i] {
			return want.at[i]
		}
	}
	if len(want.sums) != len(got.sums) {
		i := min(len(want.sums), len(got.sums))
		if i < len(want.at) {
			return want.at[i]
		}
		return got.at[i]
	}
	return -1
}

func formatOps(ops []op) string {
	var b strings.Builder
	for i, o := range ops {
		fmt.Fprintf(&b, "\t%3d %v\n", i, o)
	}
	return b.String()
}
