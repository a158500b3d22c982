package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/archive/archivetest"
)

// TestArchiveCommands: backup (full, then incremental with --from),
// archive ls, restore, verify, rm, gc and hydrate from an s3:// backup,
// against a real S3 server (versitygw).
func TestArchiveCommands(t *testing.T) {
	if _, err := archivetest.GatewayPath(); err != nil {
		t.Skip(err)
	}
	gw, err := archivetest.StartGateway(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(gw.Kill)
	require.NoError(t, gw.MakeBucket(context.Background(), "cli"))
	t.Setenv("AWS_ENDPOINT_URL", gw.Endpoint())
	t.Setenv("AWS_ACCESS_KEY_ID", archivetest.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", archivetest.SecretKey)
	t.Setenv("BLOCKSNAP_ARCHIVE_PASSPHRASE", "cli test")
	const repo = "s3://cli/vm1"

	f := newFixture(t)
	f.write(t, 0, 64<<10, 0xab)
	ok(t, f.args("snapshot", "mon")...)
	var full, inc backupResult
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("backup", "mon", "--to", repo, "--json")...)), &full))
	require.Equal(t, "mon", full.Snapshot)
	require.Equal(t, 1, full.Sent)
	f.write(t, 1<<20, 4096, 0xcd)
	ok(t, f.args("snapshot", "tue")...)
	require.NoError(t, json.Unmarshal([]byte(ok(t, f.args("backup", "tue", "--to", repo, "--from", "mon", "--json")...)), &inc))
	require.Equal(t, full.ID, inc.Parent)
	require.Equal(t, int64(64<<10), inc.ReadBytes) // one chunk changed
	require.Contains(t, ok(t, f.args("backup", "tue", "--to", repo, "--from", "mon")...), "incremental backup")

	ls := ok(t, "archive", "ls", repo)
	require.Contains(t, ls, full.ID)
	require.Contains(t, ls, inc.ID)

	want, err := os.ReadFile(f.origin) // the origin holds tue's contents
	require.NoError(t, err)
	target := filepath.Join(f.dir, "restored.img")
	require.Contains(t, ok(t, "restore", repo+"/"+inc.ID, "--to", target), "restored "+inc.ID)
	got, err := os.ReadFile(target)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the restored file differs from the origin")

	require.Contains(t, ok(t, "archive", "verify", repo, "--read-data"), ", 0 bad")
	ok(t, "archive", "rm", repo+"/"+full.ID)
	require.Contains(t, ok(t, "archive", "gc", repo), "deleted")
	require.NotContains(t, ok(t, "archive", "ls", repo), "\n"+full.ID+" ") // still named as a parent

	// Instant restore: hydrate straight from the backup.
	dest, meta := filepath.Join(f.dir, "vm.img"), filepath.Join(f.dir, "vm.meta")
	ok(t, "hydrate", "--source", repo+"/"+inc.ID, "--dest", dest, "--meta", meta)
	got, err = os.ReadFile(dest)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the hydrated file differs from the origin")

	t.Setenv("BLOCKSNAP_ARCHIVE_PASSPHRASE", "wrong")
	fails(t, 1, "wrong passphrase", "archive", "ls", repo)
	fails(t, 1, "bucket does not exist", "archive", "ls", "s3://nosuchbucket/x")
	fails(t, 2, "LOCATION/BACKUP", "restore", "s3://cli", "--to", target)
}
