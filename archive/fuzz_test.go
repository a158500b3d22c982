package archive

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func sampleManifest() *Manifest {
	m := &Manifest{ID: "20261129T000000.000Z-abcdef", Parent: "p1", Volume: "vm1", Snapshot: "mon", SnapID: 7,
		Created: time.Unix(1700000000, 5).UTC(), Size: 3*64<<10 + 4096, BlockSize: 64 << 10, DevBlock: 4096,
		Blocks: make([]Hash, 4)}
	m.Blocks[1][0], m.Blocks[3][31] = 1, 2
	return m
}

func TestManifestRoundTrip(t *testing.T) {
	m := sampleManifest()
	got, err := decodeManifest(m.encode())
	require.NoError(t, err)
	require.Equal(t, m, got)
}

// TestManifestBitFlips: every single-bit flip of a manifest is rejected.
func TestManifestBitFlips(t *testing.T) {
	b := sampleManifest().encode()
	for i := range len(b) * 8 {
		c := bytes.Clone(b)
		c[i/8] ^= 1 << (i % 8)
		_, err := decodeManifest(c)
		require.ErrorIs(t, err, ErrCorrupt, "bit %d", i)
	}
}

func FuzzDecodeManifest(f *testing.F) {
	f.Add(sampleManifest().encode())
	f.Add([]byte(manMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeManifest(b)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, b, m.encode())
	})
}

func FuzzDecodeConfig(f *testing.F) {
	f.Add(encodeConfig(repoConfig{Format: 1, ID: "x", BlockSize: 1 << 20, Hash: "sha256", Compression: "zstd"}))
	f.Add(encodeConfig(repoConfig{Format: 1, ID: "x", BlockSize: 1 << 20, Hash: "hmac-sha256", Compression: "zstd",
		Encryption: &cryptoCfg{Cipher: "aes-256-gcm", KDF: "scrypt", Salt: []byte{1}, N: 1024, R: 8, P: 1}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := decodeConfig(b); err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
		}
	})
}

func FuzzOpenObject(f *testing.F) {
	plain, err := newCodec(nil)
	require.NoError(f, err)
	crypt, err := newCodec(bytes.Repeat([]byte{7}, 32))
	require.NoError(f, err)
	data := bytes.Repeat([]byte("blocksnap "), 1000)
	for _, c := range []*codec{plain, crypt} {
		f.Add(bytes.Clone(*c.seal("k", data)))
		f.Add(bytes.Clone(*c.seal("k", []byte{1, 2, 3})))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, c := range []*codec{plain, crypt} {
			out, err := c.open("k", bytes.Clone(b), nil)
			if err != nil {
				require.ErrorIs(t, err, ErrCorrupt)
				continue
			}
			require.LessOrEqual(t, len(out), maxPlain)
		}
	})
}

func TestObjectRoundTrip(t *testing.T) {
	for _, key := range [][]byte{nil, bytes.Repeat([]byte{9}, 32)} {
		c, err := newCodec(key)
		require.NoError(t, err)
		for _, data := range [][]byte{{}, {1}, bytes.Repeat([]byte{0xab}, 1<<16), randomBytes(70000)} {
			obj := bytes.Clone(*c.seal("blocks/aa/x", data))
			got, err := c.open("blocks/aa/x", bytes.Clone(obj), nil)
			require.NoError(t, err)
			require.Equal(t, len(data), len(got))
			require.True(t, bytes.Equal(data, got))
			if key != nil { // bound to its name
				_, err = c.open("blocks/aa/y", obj, nil)
				require.ErrorIs(t, err, ErrCorrupt)
			}
		}
		c.close()
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7919 + i>>3*31)
	}
	return b
}

func FuzzDecodeIndex(f *testing.F) {
	f.Add(encodeIndex([]idxEntryT{{h: Hash{1}, off: 0, n: 100}, {h: Hash{2}, off: 100, n: 50}}))
	f.Add(encodeIndex(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := decodeIndex(b)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, b, encodeIndex(es))
	})
}
