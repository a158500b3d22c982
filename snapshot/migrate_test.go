package snapshot

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/journal"
)

// v1Image encodes a format version 1 checkpoint image: c's small state
// followed by entry runs (each b, e, c, n, loc; loc a store chunk).
func v1Image(c *capture, runs [][5]uint64) []byte {
	var buf bytes.Buffer
	e := &encoder{w: bufio.NewWriter(&buf), crc: crc32.New(castagnoli)}
	c.encodeVersion(e, oldCheckpointVersion)
	check(e.w.Flush())
	body := buf.Bytes()[:buf.Len()-1] // drop the end tag
	for _, r := range runs {          // each run a tag 1 with its own branch and epoch
		body = append(body, 1)
		for _, v := range []uint64{r[0], r[1], r[2], r[3], r[4] + 2} {
			body = binary.AppendUvarint(body, v)
		}
	}
	body = append(body, 0)
	return binary.LittleEndian.AppendUint32(body, checksum(saltCheckpoint, body))
}

// v1Store writes a format version 1 store by hand: its superblock, a
// journal whose checkpoint holds a snapshot "s1" of the origin with chunks
// 0-3 (store chunks 0-3), and records after it that add a clone "c" of s1
// with its own chunk 5 (store chunk 4). It returns the store device and
// what each volume must read.
func v1Store(t *testing.T, origin *blockdev.Mem) (*blockdev.Mem, map[string][]byte) {
	const cs = 4096
	store, err := blockdev.NewMem(4<<20, 4096)
	require.NoError(t, err)
	g := geometry{version: oldSuperblockVersion, chunkSize: cs, originSize: origin.Size(), storeSize: store.Size(),
		journalOff: superblockSize, journalLen: 512 << 10, dataOff: superblockSize + 512<<10, formatted: 12345}
	g.dataChunks = uint64((g.storeSize - g.dataOff) / cs)
	g.uuid[0] = 7
	_, err = store.WriteAt(g.encode(), 0)
	require.NoError(t, err)
	jdev, err := blockdev.Slice(store, g.journalOff, g.journalLen)
	require.NoError(t, err)
	j, err := journal.Format(jdev, journal.Options{CheckpointSize: g.journalLen / 4 / 4096 * 4096})
	require.NoError(t, err)
	ctx := context.Background()
	appendOps := func(ops ...op) {
		_, err := j.Append(ctx, encodeRecord(nil, ops))
		require.NoError(t, err)
	}
	appendOps(op{kind: opVolume, id: 2, vkind: KindSnapshot, b: 0, e: 1, time: 1, name: "s1"})
	old := blockdevtest.ReadAll(t, origin)
	for c := uint64(0); c < 4; c++ { // the snapshot's copies: the origin's chunks as they were
		_, err := store.WriteAt(old[c*cs:(c+1)*cs], g.dataOff+int64(c)*cs)
		require.NoError(t, err)
	}
	require.NoError(t, j.Commit(ctx))
	img := v1Image(&capture{nextVol: 3, nextBr: 1,
		volumes:  []volRec{{id: 2, name: "s1", kind: KindSnapshot, epoch: 1, created: 1}},
		branches: []branchRec{{id: 0, lastEpoch: 1}}}, [][5]uint64{{0, 1, 0, 4, 0}})
	require.NoError(t, j.Checkpoint(ctx, 1, func(w io.Writer) error { _, err := w.Write(img); return err }))
	clone := bytes.Repeat([]byte{0xc1}, cs)
	_, err = store.WriteAt(clone, g.dataOff+4*cs)
	require.NoError(t, err)
	appendOps(op{kind: opBranch, id: 1, b: 0, e: 1},
		op{kind: opVolume, id: 3, vkind: KindClone, b: 1, e: epochLive, time: 2, parent: 2, name: "c"},
		op{kind: opPut, b: 1, e: epochLive, c: 5, n: 1, loc: 4})
	require.NoError(t, j.Commit(ctx))
	require.NoError(t, j.Close())
	now := bytes.Repeat([]byte{0x0a}, 4*cs) // the origin changed after the snapshot
	_, err = origin.WriteAt(now, 0)
	require.NoError(t, err)
	cur := blockdevtest.ReadAll(t, origin)
	wantC := append([]byte(nil), old...)
	copy(wantC[5*cs:], clone)
	return store, map[string][]byte{"origin": cur, "s1": old, "c": wantC}
}

// A version 1 store is refused by Open with ErrOldFormat (the error names
// both versions and the command); Migrate converts it into a new device,
// leaving the old one untouched, and the new store reads the same volumes
// and passes Check.
func TestMigrateVersion1(t *testing.T) {
	origin, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 3)
	old, want := v1Store(t, origin)
	if dir := os.Getenv("BLOCKSNAP_WRITE_V1_FIXTURE"); dir != "" {
		// The fixture of cmd/blocksnap's migrate test.
		writeGzip(t, filepath.Join(dir, "v1-origin.img.gz"), blockdevtest.ReadAll(t, origin))
		writeGzip(t, filepath.Join(dir, "v1-store.img.gz"), blockdevtest.ReadAll(t, old))
	}
	_, err = Open(origin, old, Options{})
	require.ErrorIs(t, err, ErrOldFormat)
	require.ErrorContains(t, err, "version 1")
	require.ErrorContains(t, err, "version 2")
	require.ErrorContains(t, err, "blocksnap migrate")

	before := blockdevtest.ReadAll(t, old)
	dst, err := blockdev.NewMem(8<<20, 512)
	require.NoError(t, err)
	require.ErrorIs(t, Migrate(origin, old, old, Options{}), ErrBadOptions)
	require.NoError(t, Migrate(origin, blockdev.ReadOnly(old), dst, Options{}))
	require.Equal(t, before, blockdevtest.ReadAll(t, old), "the old store changed")
	require.ErrorIs(t, Migrate(origin, dst, old, Options{}), ErrBadOptions, "a current store is not migrated")

	s, err := Open(origin, dst, Options{})
	require.NoError(t, err)
	require.NoError(t, s.Check())
	require.Equal(t, [16]byte{7}, s.geo.uuid, "the store identity is kept")
	require.Equal(t, want, volumeImages(t, s))
	require.NoError(t, s.Close())

	small, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	require.ErrorIs(t, Migrate(origin, old, small, Options{}), ErrBadOptions, "fewer data chunks than the old store")
	_, err = Open(origin, small, Options{})
	require.ErrorIs(t, err, ErrCorrupt, "a failed migration leaves no store behind")
}

func writeGzip(t *testing.T, path string, b []byte) {
	f, err := os.Create(path)
	require.NoError(t, err)
	w := gzip.NewWriter(f)
	_, err = w.Write(b)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	require.NoError(t, f.Close())
}
