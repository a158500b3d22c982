package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestArchive(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), &out, t.TempDir(), ""))
	t.Log("\n" + out.String())
	s := out.String()
	require.Contains(t, s, "full backup ")
	require.Contains(t, s, "incremental backup ")
	require.Contains(t, s, "restored: restore.img equals snapshot tue byte for byte")
	require.Contains(t, s, "instant restore: read the clone with 0 of ")
	require.Contains(t, s, "hydrated: the clone equals snapshot tue")
}

func TestArchiveDir(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), &out, t.TempDir(), t.TempDir()))
	require.Contains(t, out.String(), "hydrated: the clone equals snapshot tue")
}
