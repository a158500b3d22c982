package snapshot

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/journal"
)

// A format version 1 store made a chunk freed by a record reusable as soon
// as that record was durable, so its journal tail may free a store chunk
// in one record and reference it again in a later one (here: a clone
// chunk discarded, then another clone chunk written into the same store
// chunk), all after the last checkpoint, as a crash leaves it. Migrate
// replays that tail: it must take the second reference, not refuse it as
// a chunk referenced twice, and the new store must read as the old.
func TestReviewMigrateReusedChunkInTail(t *testing.T) {
	const cs = 4096
	origin, err := blockdev.NewMem(64<<10, 512)
	require.NoError(t, err)
	fillPattern(t, origin, 5)
	old, err := blockdev.NewMem(4<<20, 4096)
	require.NoError(t, err)
	g := geometry{version: oldSuperblockVersion, chunkSize: cs, originSize: origin.Size(), storeSize: old.Size(),
		journalOff: superblockSize, journalLen: 512 << 10, dataOff: superblockSize + 512<<10, formatted: 1}
	g.dataChunks = uint64((g.storeSize - g.dataOff) / cs)
	_, err = old.WriteAt(g.encode(), 0)
	require.NoError(t, err)
	jdev, err := blockdev.Slice(old, g.journalOff, g.journalLen)
	require.NoError(t, err)
	j, err := journal.Format(jdev, journal.Options{CheckpointSize: g.journalLen / 4 / 4096 * 4096})
	require.NoError(t, err)
	ctx := context.Background()
	appendOps := func(ops ...op) {
		_, err := j.Append(ctx, encodeRecord(nil, ops))
		require.NoError(t, err)
		require.NoError(t, j.Commit(ctx))
	}
	orig := blockdevtest.ReadAll(t, origin)
	appendOps(op{kind: opVolume, id: 2, vkind: KindSnapshot, b: 0, e: 1, time: 1, name: "s1"})
	img := v1Image(&capture{nextVol: 3, nextBr: 1,
		volumes:  []volRec{{id: 2, name: "s1", kind: KindSnapshot, epoch: 1, created: 1}},
		branches: []branchRec{{id: 0, lastEpoch: 1}}}, nil)
	require.NoError(t, j.Checkpoint(ctx, 1, func(w io.Writer) error { _, err := w.Write(img); return err }))
	first := bytes.Repeat([]byte{0xc1}, cs)
	_, err = old.WriteAt(first, g.dataOff+4*cs)
	require.NoError(t, err)
	appendOps(op{kind: opBranch, id: 1, b: 0, e: 1},
		op{kind: opVolume, id: 3, vkind: KindClone, b: 1, e: epochLive, time: 2, parent: 2, name: "c"},
		op{kind: opPut, b: 1, e: epochLive, c: 5, n: 1, loc: 4})
	appendOps(op{kind: opDel, b: 1, e: epochLive, c: 5, n: 1}, // discard: store chunk 4 freed
		op{kind: opPut, b: 1, e: epochLive, c: 5, n: 1, loc: locZero})
	second := bytes.Repeat([]byte{0xc2}, cs)
	_, err = old.WriteAt(second, g.dataOff+4*cs)
	require.NoError(t, err)
	appendOps(op{kind: opPut, b: 1, e: epochLive, c: 7, n: 1, loc: 4}) // and reused
	require.NoError(t, j.Close())
	wantC := append([]byte(nil), orig...)
	copy(wantC[5*cs:6*cs], make([]byte, cs))
	copy(wantC[7*cs:8*cs], second)

	dst, err := blockdev.NewMem(8<<20, 512)
	require.NoError(t, err)
	require.NoError(t, Migrate(origin, blockdev.ReadOnly(old), dst, Options{}))
	s, err := Open(origin, dst, Options{})
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.Check())
	require.Equal(t, map[string][]byte{"origin": orig, "s1": orig, "c": wantC}, volumeImages(t, s))
}
