package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestBackup(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), &out, t.TempDir()))
	t.Log("\n" + out.String())
	s := out.String()
	require.Contains(t, s, "hour-00: full export")
	require.Contains(t, s, "hour-03: incremental export from hour-02")
	require.Contains(t, s, "restored backup-03.bsd: the target is now at hour-03")
	require.Contains(t, s, "verified: the restored file equals snapshot hour-03 byte for byte")
}
