package exception

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

func newMem(t testing.TB, size int64, bs int) *blockdev.Mem {
	t.Helper()
	m, err := blockdev.NewMem(size, bs)
	require.NoError(t, err)
	return m
}

func newOrigin(t testing.TB, dev blockdev.Device) *Origin {
	t.Helper()
	o, err := NewOrigin(dev, OriginOptions{})
	require.NoError(t, err)
	return o
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func readAll(t testing.TB, d blockdev.Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	_, err := d.ReadAt(p, 0)
	require.NoError(t, err)
	return p
}

func mustWrite(t testing.TB, d blockdev.Device, p []byte, off int64) {
	t.Helper()
	_, err := d.WriteAt(p, off)
	require.NoError(t, err)
}

// firstDiff returns the offset of the first differing byte, or -1.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
