package meta

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/stretchr/testify/require"
)

// lead7Leaf builds a full leaf of tree k shaped like a random fill's:
// single-chunk runs of one epoch range at scattered chunks (and, in the
// chunk tree, scattered data locations), encoded as a page.
func lead7Leaf(t testing.TB, k kind, seed uint64) (*node, []byte) {
	rng := rand.New(rand.NewPCG(seed, 7))
	n := &node{loc: 9, tx: 3, kind: k}
	c, size, prev := uint64(1_000_000), 0, run{}
	for {
		c += 1 + rng.Uint64N(20)
		x := run{b: 1, e: 2, c: c, n: 1}
		if k == chunkTree {
			x.loc = rng.Uint64N(1 << 24)
		}
		if size+k.encLen(prev, x) > leafCap {
			break
		}
		size += k.encLen(prev, x)
		n.runs = append(n.runs, x)
		prev = x
	}
	n.size = size
	p := make([]byte, PageSize)
	n.encode(p)
	return n, p
}

func BenchmarkLead7DecodeLeaf(b *testing.B) {
	for _, k := range []kind{chunkTree, epochTree} {
		name := map[kind]string{chunkTree: "chunk", epochTree: "epoch"}[k]
		b.Run(name, func(b *testing.B) {
			want, p := lead7Leaf(b, k, 1)
			b.ReportAllocs()
			b.ReportMetric(float64(len(want.runs)), "runs")
			for b.Loop() {
				got, err := decodeNode(p, 9, k, 3, 0)
				if err != nil || len(got.runs) != len(want.runs) {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestLead7DecodeRoundTrip: decoding an encoded leaf gives back its runs.
func TestLead7DecodeRoundTrip(t *testing.T) {
	for _, k := range []kind{chunkTree, epochTree} {
		for seed := range uint64(20) {
			want, p := lead7Leaf(t, k, seed)
			got, err := decodeNode(p, 9, k, 3, 0)
			require.NoError(t, err)
			require.Equal(t, want.runs, got.runs)
			require.Equal(t, want.size, got.size)
		}
	}
}

func BenchmarkLead7EncodeLeaf(b *testing.B) {
	for _, k := range []kind{chunkTree, epochTree} {
		name := map[kind]string{chunkTree: "chunk", epochTree: "epoch"}[k]
		b.Run(name, func(b *testing.B) {
			n, _ := lead7Leaf(b, k, 1)
			p := make([]byte, PageSize)
			b.ReportAllocs()
			for b.Loop() {
				n.encode(p)
			}
		})
	}
}

func BenchmarkLead7DecodeRunsOnly(b *testing.B) {
	for _, k := range []kind{chunkTree, epochTree} {
		name := map[kind]string{chunkTree: "chunk", epochTree: "epoch"}[k]
		b.Run(name, func(b *testing.B) {
			want, p := lead7Leaf(b, k, 1)
			runs := make([]run, len(want.runs))
			for b.Loop() {
				var err error
				if k == chunkTree {
					_, err = decodeChunkRuns(p[headerSize:], runs, 9)
				} else {
					_, err = decodeEpochRuns(p[headerSize:], runs, 9)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// lead7DecRun decodes one run coded against prev from p; it returns the run and
// the bytes used, or used <= 0 if p is short or a field is out of range.
func (k kind) lead7DecRun(p []byte, prev run) (x run, used int) {
	var f [5]uint64
	nf := 4
	if k == chunkTree {
		nf = 5
	}
	for i := 0; i < nf; i++ {
		v, m := binary.Uvarint(p[used:])
		if m <= 0 {
			return x, -1
		}
		f[i] = v
		used += m
	}
	if f[0] > math.MaxUint32 || f[3] >= math.MaxUint32 {
		return x, -1
	}
	x.b = prev.b + uint32(f[0])
	x.n = uint32(f[3]) + 1
	if k == chunkTree {
		x.c = f[1]
		if x.b == prev.b {
			x.c = prev.c + f[1]
		}
		x.e = prev.e + uint32(int32(unzigzag(f[2])))
		x.loc = prev.loc + uint64(prev.n) + uint64(unzigzag(f[4]))
		return x, used
	}
	if f[1] > math.MaxUint32 {
		return x, -1
	}
	x.e = uint32(f[1])
	if x.b == prev.b {
		x.e = prev.e + uint32(f[1])
	}
	x.c = prev.c + uint64(unzigzag(f[2]))
	return x, used
}

// lead7RefDecodeRuns is the plain leaf decoder decodeChunkRuns and
// decodeEpochRuns replaced: each run through lead7DecRun, then the checks
// against the run before it. It returns the runs, the bytes used, or
// whether the body is corrupt.
func lead7RefDecodeRuns(k kind, body []byte, count int) ([]run, int, bool) {
	runs := make([]run, 0, count)
	prev, off := run{}, 0
	for i := 0; i < count; i++ {
		x, m := k.lead7DecRun(body[off:], prev)
		if m <= 0 {
			return nil, 0, false
		}
		if i > 0 && k.cmp(k.last(prev), x) >= 0 {
			return nil, 0, false
		}
		if x.c+uint64(x.n)-1 < x.c {
			return nil, 0, false
		}
		if k == chunkTree && x.loc < LocSpecial && x.loc+uint64(x.n) > LocSpecial {
			return nil, 0, false
		}
		if k == chunkTree && x.loc >= LocSpecial && x.n != 1 {
			return nil, 0, false
		}
		off += m
		runs = append(runs, x)
		prev = x
	}
	return runs, off, true
}

// lead7CheckDecode compares the leaf decoder with the reference on body.
func lead7CheckDecode(t testing.TB, k kind, body []byte, count int) {
	want, wantOff, ok := lead7RefDecodeRuns(k, body, count)
	got := make([]run, count)
	var off int
	var err error
	if k == chunkTree {
		off, err = decodeChunkRuns(body, got, 9)
	} else {
		off, err = decodeEpochRuns(body, got, 9)
	}
	if !ok {
		require.ErrorIs(t, err, ErrCorrupt, "the reference rejects the body")
		return
	}
	require.NoError(t, err)
	require.Equal(t, wantOff, off)
	require.Equal(t, want, got)
}

// TestLead7DecodeMatchesReference: the leaf decoders agree with the plain
// decoder on full leaves, on every truncation of one, and on bodies with
// bytes changed (overlong varints, out-of-range fields, runs out of
// order), with seeds printed for a replay.
func TestLead7DecodeMatchesReference(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 11))
	for _, k := range []kind{chunkTree, epochTree} {
		n, p := lead7Leaf(t, k, seed)
		body := p[headerSize:]
		lead7CheckDecode(t, k, body, len(n.runs))
		for cut := 0; cut < n.size; cut += 1 + cut/16 {
			lead7CheckDecode(t, k, body[:cut], len(n.runs))
		}
		for range 2000 {
			b := append([]byte(nil), body[:n.size]...)
			for range 1 + rng.IntN(3) {
				switch i := rng.IntN(len(b)); rng.IntN(3) {
				case 0:
					b[i] = byte(rng.Uint32())
				case 1:
					b[i] |= 0x80
				default:
					b[i] = 0xff
				}
			}
			lead7CheckDecode(t, k, b, len(n.runs))
		}
	}
	// Hand-made bodies: fields at and past their bounds.
	big := binary.AppendUvarint(nil, math.MaxUint32)
	bigger := binary.AppendUvarint(nil, math.MaxUint32+1)
	for _, body := range [][]byte{
		append(append([]byte{}, big...), 0, 0, 0, 0),
		append(append([]byte{}, bigger...), 0, 0, 0, 0),
		append([]byte{0, 0, 0}, append(big, 0)...),
		append([]byte{0, 0, 0}, append(bigger, 0)...),
		{0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0, 0},
		{0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0},
		{0, 1, 0, 0, 0, 0, 1, 0, 0, 0},
	} {
		for _, k := range []kind{chunkTree, epochTree} {
			for count := 1; count <= 2; count++ {
				lead7CheckDecode(t, k, body, count)
			}
		}
	}
}

// FuzzLead7DecodeRuns: the leaf decoders agree with the plain decoder on
// any body.
func FuzzLead7DecodeRuns(f *testing.F) {
	for _, k := range []kind{chunkTree, epochTree} {
		_, p := lead7Leaf(f, k, 1)
		f.Add(p[headerSize:headerSize+200], uint8(k), uint8(20))
	}
	f.Fuzz(func(t *testing.T, body []byte, kb, count uint8) {
		lead7CheckDecode(t, kind(kb%2), body, int(count))
	})
}
