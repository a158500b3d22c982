package main

import (
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// gunzip writes testdata/name.gz to dir/name.
func gunzip(t *testing.T, dir, name string) string {
	t.Helper()
	in, err := os.Open(filepath.Join("testdata", name+".gz"))
	require.NoError(t, err)
	defer in.Close()
	r, err := gzip.NewReader(in)
	require.NoError(t, err)
	out := filepath.Join(dir, name)
	f, err := os.Create(out)
	require.NoError(t, err)
	_, err = io.Copy(f, r)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return out
}

// A store of format version 1 (testdata, written by the snapshot package's
// TestMigrateVersion1) is refused with a message that says to migrate;
// migrate converts it into a new file, which then lists, checks and reads
// the same volumes, and leaves the old file unchanged.
func TestMigrate(t *testing.T) {
	dir := t.TempDir()
	f := fixture{dir: dir, origin: gunzip(t, dir, "v1-origin.img"), store: gunzip(t, dir, "v1-store.img")}
	oldBytes, err := os.ReadFile(f.store)
	require.NoError(t, err)
	fails(t, 1, "blocksnap migrate", f.args("list")...)
	to := filepath.Join(dir, "store2.img")
	fails(t, 2, "same file", f.args("migrate", "--to", f.store)...)
	out := ok(t, f.args("migrate", "--to", to)...)
	require.Contains(t, out, "migrated")
	after, err := os.ReadFile(f.store)
	require.NoError(t, err)
	require.Equal(t, oldBytes, after, "the old store changed")
	nf := fixture{dir: dir, origin: f.origin, store: to}
	list := ok(t, nf.args("list")...)
	require.Contains(t, list, "s1")
	require.Contains(t, list, "c")
	require.Contains(t, ok(t, nf.args("check")...), "clean")
	fails(t, 1, "version 2", nf.args("migrate", "--to", filepath.Join(dir, "store3.img"))...)
	requireAbsent(t, filepath.Join(dir, "store3.img"))
}
