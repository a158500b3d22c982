package exception

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

func newOrigin(t testing.TB, dev blockdev.Device) *Origin {
	t.Helper()
	o, err := NewOrigin(dev, OriginOptions{})
	require.NoError(t, err)
	return o
}

func mustWrite(t testing.TB, d blockdev.Device, p []byte, off int64) {
	t.Helper()
	_, err := d.WriteAt(p, off)
	require.NoError(t, err)
}
