package clone

import (
	"bytes"
	"errors"
	"testing"

	"github.com/bits-and-blooms/bitset"
	"github.com/stretchr/testify/require"
)

func validGeometry() geometry {
	return geometry{RegionSize: 64 << 10, SourceSize: 10 << 20, DestSize: 12 << 20, SourceBlock: 512, DestBlock: 4096,
		Regions: 160, JournalOffset: superArea, JournalLength: 1 << 20, CheckpointSize: 8192}
}

// FuzzSuperblock: decoding never panics; what decodes re-encodes to the
// same bytes.
func FuzzSuperblock(f *testing.F) {
	f.Add(validGeometry().encode(), int64(2<<20))
	f.Add(validGeometry().encode()[:superblockSize], int64(2<<20))
	f.Add([]byte("BSNAPCLN"), int64(4096))
	f.Fuzz(func(t *testing.T, b []byte, metaSize int64) {
		g, err := decodeSuperblock(b, metaSize)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, b[:superblockSize], g.encode()[:superblockSize])
	})
}

// TestSuperblockBitFlips: every single-bit flip of a superblock is rejected.
func TestSuperblockBitFlips(t *testing.T) {
	b := validGeometry().encode()
	_, err := decodeSuperblock(b, 2<<20)
	require.NoError(t, err)
	for bit := 0; bit < superblockSize*8; bit++ {
		c := bytes.Clone(b)
		c[bit/8] ^= 1 << (bit % 8)
		_, err := decodeSuperblock(c, 2<<20)
		require.ErrorIs(t, err, ErrCorrupt, "flip of bit %d accepted", bit)
	}
}

// FuzzRecord: journal payloads decode without panics, within bounds, and
// valid hydration records round-trip.
func FuzzRecord(f *testing.F) {
	f.Add(encodeHydrated([]span{{0, 1}, {5, 3}, {100, 60}}), uint64(160))
	f.Add(encodeHydrated([]span{{159, 1}}), uint64(160))
	f.Add(encodeSession(true), uint64(1))
	f.Add(encodeSession(false), uint64(1))
	f.Add([]byte{recHydrated, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, uint64(1<<40))
	f.Fuzz(func(t *testing.T, p []byte, regions uint64) {
		rec, err := decodeRecord(p, regions, 7)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		switch rec.kind {
		case recSession:
			require.Equal(t, p, encodeSession(rec.unsynced))
		case recHydrated:
			require.LessOrEqual(t, len(rec.spans), len(p))
			var end uint64
			for _, s := range rec.spans {
				require.GreaterOrEqual(t, s.start, end)
				require.Positive(t, s.n)
				require.LessOrEqual(t, s.start+s.n, regions)
				end = s.start + s.n
			}
		default:
			t.Fatalf("decoded unknown kind %d", rec.kind)
		}
	})
}

func encodeBitmapForTest(t testing.TB, bm *bitset.BitSet, regions uint64, unsynced bool) []byte {
	var buf bytes.Buffer
	require.NoError(t, writeBitmap(&buf, bm, regions, unsynced))
	return buf.Bytes()
}

// FuzzBitmap: checkpoints decode without panics into a bitmap of exactly
// the expected region count, and valid ones round-trip.
func FuzzBitmap(f *testing.F) {
	bm := bitset.New(130)
	bm.Set(0).Set(63).Set(64).Set(129)
	f.Add(encodeBitmapForTest(f, bm, 130, false), uint16(130))
	f.Add(encodeBitmapForTest(f, bitset.New(1), 1, true), uint16(1))
	f.Add(encodeBitmapForTest(f, bitset.New(64), 64, false), uint16(64))
	f.Fuzz(func(t *testing.T, p []byte, regions uint16) {
		n := uint64(regions)
		got, unsynced, err := readBitmap(bytes.NewReader(p), n)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, uint(n), got.Len())
		_, beyond := got.NextSet(uint(n))
		require.False(t, beyond)
		require.Equal(t, p[:len(encodeBitmapForTest(t, got, n, unsynced))], encodeBitmapForTest(t, got, n, unsynced))
	})
}

func TestBitmapRoundTrip(t *testing.T) {
	for _, n := range []uint64{1, 63, 64, 65, 1000} {
		bm := bitset.New(uint(n))
		for i := uint64(0); i < n; i += 3 {
			bm.Set(uint(i))
		}
		b := encodeBitmapForTest(t, bm, n, n%2 == 0)
		got, unsynced, err := readBitmap(bytes.NewReader(b), n)
		require.NoError(t, err)
		require.True(t, got.Equal(bm))
		require.Equal(t, n%2 == 0, unsynced)
		// Every bit flip is rejected.
		for bit := 0; bit < len(b)*8; bit += 7 {
			c := bytes.Clone(b)
			c[bit/8] ^= 1 << (bit % 8)
			_, _, err := readBitmap(bytes.NewReader(c), n)
			require.True(t, errors.Is(err, ErrCorrupt), "flip of bit %d of %d-region bitmap accepted", bit, n)
		}
		_, _, err = readBitmap(bytes.NewReader(b), n+1)
		require.ErrorIs(t, err, ErrCorrupt, "wrong region count")
	}
}

func TestRecordRoundTrip(t *testing.T) {
	spans := make([]span, 0, spansPerRecord)
	for i := uint64(0); i < spansPerRecord; i++ {
		spans = append(spans, span{start: i * 1 << 40, n: 1<<40 - 1})
	}
	p := encodeHydrated(spans)
	require.LessOrEqual(t, len(p), maxPayload)
	rec, err := decodeRecord(p, spansPerRecord<<40, 1)
	require.NoError(t, err)
	require.Equal(t, spans, rec.spans)
	_, err = decodeRecord(p, spansPerRecord<<40-2, 1)
	require.ErrorIs(t, err, ErrCorrupt, "span past the last region")
}
