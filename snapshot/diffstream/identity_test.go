package diffstream

import (
	"bytes"
	"context"
	"encoding/binary"
	"hash/crc32"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// oldHeader is a header laid out as every writer before extension fields
// wrote it, built here by hand from the layout so that a change of the
// encoder cannot hide a change of what older streams look like.
func oldHeader(h Header) []byte {
	b := []byte(Magic)
	b = binary.LittleEndian.AppendUint16(b, Version1)
	b = binary.LittleEndian.AppendUint16(b, 0)
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	b = binary.LittleEndian.AppendUint64(b, uint64(h.VolumeSize))
	b = binary.LittleEndian.AppendUint32(b, uint32(h.BlockSize))
	b = binary.LittleEndian.AppendUint32(b, uint32(h.ChunkSize))
	for _, s := range []string{h.From.ID, h.From.Name, h.To.ID, h.To.Name} {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	binary.LittleEndian.PutUint16(b[10:], uint16(len(b)+4))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// Volume UUIDs travel in extension fields: a header without them is byte
// for byte the older layout, which reads back with empty UUIDs; one with
// them round-trips, and older readers (which skip the area) still get IDs
// and names.
func TestHeaderCarriesUUIDs(t *testing.T) {
	h := Header{Version: Version1, VolumeSize: 64 << 10, BlockSize: 512, ChunkSize: 4096,
		From: Identity{ID: "3-17", Name: "golden@v1"}, To: Identity{ID: "9-42", Name: "vm1@s1"}}
	old := oldHeader(h)
	require.Equal(t, old, encodeHeader(nil, h), "no UUIDs: the older layout exactly")
	got, err := decodeHeader(old)
	require.NoError(t, err)
	require.Equal(t, h, got)

	h.From.UUID = "0b6f3c8e-1d2a-8f00-9abc-0123456789ab"
	h.To.UUID = "7e57d00d-0000-8000-8000-000000000042"
	enc := encodeHeader(nil, h)
	require.Greater(t, len(enc), len(old))
	got, err = decodeHeader(enc)
	require.NoError(t, err)
	require.Equal(t, h, got)
	// What a reader before extension fields sees: the fields up to To name
	// (the length at byte 10 differs, and covers the extension).
	require.Equal(t, old[:10], enc[:10])
	require.Equal(t, old[12:len(old)-4], enc[12:len(old)-4])

	// A header readers would refuse for its length is not written.
	long := strings.Repeat("n", MaxIdentity)
	_, err = NewWriter(&bytes.Buffer{}, Header{VolumeSize: 512, BlockSize: 512,
		From: Identity{ID: long, Name: long}, To: Identity{ID: long, Name: long, UUID: "u"}})
	require.ErrorContains(t, err, "more than 4096")
	long = strings.Repeat("n", 1000)
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{VolumeSize: 512, BlockSize: 512,
		From: Identity{ID: long, Name: long}, To: Identity{ID: long, Name: long[:980], UUID: h.To.UUID}})
	require.NoError(t, err)
	_, err = w.Close()
	require.NoError(t, err)
	r, err := NewReader(&buf)
	require.NoError(t, err)
	require.Equal(t, h.To.UUID, r.Header().To.UUID)

	// A full export has no From, so no From UUID.
	_, err = NewWriter(&bytes.Buffer{}, Header{VolumeSize: 512, BlockSize: 512, Flags: FlagFull, To: h.To, From: Identity{UUID: "x"}})
	require.Error(t, err)
}

func TestIdentitySame(t *testing.T) {
	a := Identity{ID: "3-17", Name: "a", UUID: "u1"}
	require.True(t, a.Same(Identity{ID: "3-17"}), "no UUID on one side: by ID")
	require.True(t, a.Same(Identity{ID: "3-17", Name: "renamed", UUID: "u1"}))
	require.False(t, a.Same(Identity{ID: "3-17", UUID: "u2"}), "same ID in another store")
	require.False(t, a.Same(Identity{ID: "4-17"}))
	require.Equal(t, "a (3-17, uuid u1)", a.String())
}

// Apply compares the target's state with the stream's From by UUID when
// both have one: a stream from a volume of another store with the same ID
// is refused, and the refusal says how to force it; a state file written
// before UUIDs (none in At) matches by ID.
func TestApplyChecksBaseUUID(t *testing.T) {
	ctx := context.Background()
	v := newVolume(t, 5, 256<<10)
	s0 := v.snapshot()
	v.scribble(8)
	s1 := v.snapshot()
	base := Identity{ID: "1-100", Name: "golden@v1", UUID: "uuid-golden"}
	to := Identity{ID: "2-200", Name: "vm1@s1", UUID: "uuid-vm1"}
	incr := func(from Identity) []byte {
		var buf bytes.Buffer
		_, err := Export(ctx, &buf, s1, Header{From: from, To: to}, changed(t, s0, s1), nil)
		require.NoError(t, err)
		return buf.Bytes()
	}
	target, err := blockdev.NewMem(s0.Size(), 512)
	require.NoError(t, err)
	requireCopy(t, s0, target)
	state := t.TempDir() + "/state"

	require.NoError(t, WriteState(state, State{VolumeSize: s0.Size(), At: &base}))
	other := base
	other.UUID = "uuid-of-another-store"
	_, err = Apply(ctx, bytes.NewReader(incr(other)), target, ApplyOptions{StatePath: state})
	require.ErrorIs(t, err, ErrMismatch)
	require.ErrorContains(t, err, "uuid-golden")
	require.ErrorContains(t, err, "--force")
	requireSame(t, s0, target)

	// An older state file: At has no UUID.
	require.NoError(t, WriteState(state, State{VolumeSize: s0.Size(), At: &Identity{ID: base.ID, Name: base.Name}}))
	res, err := Apply(ctx, bytes.NewReader(incr(base)), target, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	require.False(t, res.NoOp)
	requireSame(t, s1, target)
	st, err := ReadState(state)
	require.NoError(t, err)
	require.Equal(t, to, *st.At, "the state keeps the UUID")
	// Applying it again is a no-op, recognised by UUID.
	res, err = Apply(ctx, bytes.NewReader(incr(base)), target, ApplyOptions{StatePath: state})
	require.NoError(t, err)
	require.True(t, res.NoOp)
}
