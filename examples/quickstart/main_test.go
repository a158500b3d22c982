package main

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestQuickstart(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(&out, t.TempDir()))
	t.Log("\n" + out.String())
	s := out.String()
	require.Contains(t, s, `live disk:       block 0: "hello from version 2"`)
	require.Contains(t, s, `snapshot monday: block 0: "hello from version 1"   at 8 MiB: "(zeros)"`)
	require.Contains(t, s, "         0 +65536 bytes")
	require.Contains(t, s, "   8388608 +65536 bytes")
	require.Contains(t, s, "summary: 128 KiB changed since monday; the snapshot keeps 128 KiB")
}
