package archive

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/archive/archivetest"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/blocksnap/blocksnap/clone"
)

// TestS3 runs the whole life of a repository against a real S3 server:
// full and incremental backups of snapshots, restore, a lazy image as a
// clone's source, delete, GC and verify.
func TestS3(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 10))
	g := startGateway(t)
	be := g.backend(t, "backups", "site1/vm1")
	r, err := Create(ctx, be, Options{BlockSize: 64 << 10, Passphrase: []byte("pw"), ScryptN: 1 << 10})
	require.NoError(t, err)
	defer r.Close()

	const size = 8 << 20
	st, live := newStore(t, size)
	fillVolume(t, live, rng)
	s1, err := st.CreateSnapshot("mon", live)
	require.NoError(t, err)
	var calls atomic.Int64
	full, err := r.BackupSnapshot(ctx, st, s1, nil, BackupOptions{Volume: "vm1",
		Progress: func(Progress) { calls.Add(1) }})
	require.NoError(t, err)
	require.Positive(t, calls.Load())
	for range 20 {
		_, err := live.WriteAt(make([]byte, 4096), rng.Int64N(size/4096)*4096)
		require.NoError(t, err)
		b := make([]byte, 4096)
		b[7] = byte(rng.Uint32())
		_, err = live.WriteAt(b, rng.Int64N(size/4096)*4096)
		require.NoError(t, err)
	}
	s2, err := st.CreateSnapshot("tue", live)
	require.NoError(t, err)
	inc, err := r.BackupSnapshot(ctx, st, s2, s1, BackupOptions{Volume: "vm1", Parent: full.Manifest.ID})
	require.NoError(t, err)
	require.Less(t, inc.Progress.TotalBytes, int64(size/2))

	dst := memDev(t, size)
	_, err = r.Restore(ctx, inc.Manifest.ID, dst, RestoreOptions{})
	require.NoError(t, err)
	requireSame(t, s2, dst, size)

	// The backup as a clone's source: readable at once, hydrating behind.
	im, err := Open(ctx, r, inc.Manifest.ID, t.TempDir())
	require.NoError(t, err)
	cl, err := clone.Create(im, memDev(t, size), memDev(t, 1<<20), clone.Options{NoHydration: true})
	require.NoError(t, err)
	requireSame(t, s2, cl, size)
	require.Less(t, cl.Status().Hydrated, cl.Status().Regions)
	cl.Resume()
	require.NoError(t, cl.Wait(ctx))
	require.NoError(t, cl.Close())
	require.NoError(t, im.Close())

	require.NoError(t, r.DeleteBackup(ctx, full.Manifest.ID))
	_, err = r.Manifest(ctx, full.Manifest.ID)
	require.ErrorIs(t, err, ErrNotFound)
	gr, err := r.GC(ctx, GCOptions{})
	require.NoError(t, err)
	require.Positive(t, gr.Deleted)
	vr, err := r.Verify(ctx, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Equal(t, 1, vr.Backups)

	// Reopen through a new client: the key unlocks the same backups.
	be2, err := NewS3(ctx, g.options("backups", "site1/vm1/"))
	require.NoError(t, err)
	r2, err := OpenRepo(ctx, be2, Options{Passphrase: []byte("pw")})
	require.NoError(t, err)
	defer r2.Close()
	ms, err := r2.Backups(ctx)
	require.NoError(t, err)
	require.Len(t, ms, 1)
	_, err = OpenRepo(ctx, be2, Options{Passphrase: []byte("pW")})
	require.ErrorIs(t, err, ErrWrongKey)
}

// killingDev kills the gateway when the backup has read n blocks.
type killingDev struct {
	blockdev.Device
	reads atomic.Int64
	n     int64
	g     *gateway
}

func (d *killingDev) ReadAt(p []byte, off int64) (int, error) {
	if d.reads.Add(1) == d.n {
		d.g.kill()
	}
	return d.Device.ReadAt(p, off)
}

func TestS3KillResume(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 11))
	g := startGateway(t)
	r := g.repo(t, "bkt", "")
	src := randomDev(t, rng, 8<<20)
	const blocks = 128
	// Packs of 4 blocks, so the first run completes some.
	_, err := r.Backup(ctx, &killingDev{Device: src, n: blocks / 2, g: g}, BackupOptions{ID: "b1", Parallel: 4, PackSize: 256 << 10})
	require.Error(t, err)
	g.start()
	res, err := r.Backup(ctx, src, BackupOptions{ID: "b1", Parallel: 4, PackSize: 256 << 10})
	require.NoError(t, err)
	p := res.Progress
	t.Logf("after restart: %d uploaded, %d already there", p.Uploaded, p.Deduped)
	require.Equal(t, blocks, p.Uploaded+p.Deduped)
	require.Positive(t, p.Deduped, "nothing of the first run was kept")
	require.Less(t, p.Uploaded, blocks)
	_, err = r.Verify(ctx, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	dst := memDev(t, src.Size())
	_, err = r.Restore(ctx, "b1", dst, RestoreOptions{})
	require.NoError(t, err)
	requireSame(t, src, dst, src.Size())
}

func TestS3CorruptBlock(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 12))
	g := startGateway(t)
	r := g.repo(t, "bkt", "p")
	src := memDev(t, 2<<20)
	fillVolume(t, src, rng)
	const bad = 5
	b := make([]byte, 64<<10)
	b[100] = 42
	_, err := src.WriteAt(b, bad*64<<10)
	require.NoError(t, err)
	// One block per pack, so that removing a pack removes one block.
	res, err := r.Backup(ctx, src, BackupOptions{PackSize: 1})
	require.NoError(t, err)

	key, off, n := blockObject(t, r, res.Manifest.Blocks[bad])
	path := g.objectPath("bkt", "p/"+key)
	obj, err := os.ReadFile(path)
	require.NoError(t, err)
	obj[off+n-3] ^= 0x10
	require.NoError(t, os.WriteFile(path, obj, 0o644))

	_, err = r.Restore(ctx, res.Manifest.ID, memDev(t, src.Size()), RestoreOptions{})
	var berr *BlockError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, bad, berr.Index)
	require.Equal(t, int64(bad*64<<10), berr.Offset)
	require.Contains(t, err.Error(), "offset 327680")

	vr, err := r.Verify(ctx, VerifyOptions{ReadData: true})
	require.ErrorAs(t, err, &berr)
	require.Len(t, vr.Problems, 1)
	require.Equal(t, int64(bad*64<<10), vr.Problems[0].Offset)
	require.ErrorIs(t, vr.Problems[0], ErrCorrupt)

	// A missing block is named too, without reading data.
	require.NoError(t, os.Remove(path))
	vr, err = r.Verify(ctx, VerifyOptions{})
	require.ErrorIs(t, err, ErrNotFound)
	require.Equal(t, bad, vr.Problems[0].Index)

	// A lazy read of it fails with the block named; others still read.
	im, err := Open(ctx, r, res.Manifest.ID, "")
	require.NoError(t, err)
	defer im.Close()
	_, err = im.ReadAt(make([]byte, 4096), bad*64<<10)
	require.ErrorAs(t, err, &berr)
	require.ErrorIs(t, err, blockdev.ErrIO)
	_, err = im.ReadAt(make([]byte, 4096), 0)
	require.NoError(t, err)
}

func TestS3MissingBucket(t *testing.T) {
	g := startGateway(t)
	_, err := NewS3(context.Background(), g.options("nosuchbucket", ""))
	require.ErrorIs(t, err, ErrNoBucket)
	g.makeBucket(t, "empty")
	be, err := NewS3(context.Background(), g.options("empty", ""))
	require.NoError(t, err)
	_, err = OpenRepo(context.Background(), be, Options{})
	require.ErrorIs(t, err, ErrNoRepo)
}

// TestS3SlowServer reads lazily through a proxy that delays every chunk
// the server sends: reads complete within the context's deadline, and once
// the context ends, reads of blocks not cached fail at once instead of
// hanging.
func TestS3SlowServer(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(testSeed(t), 13))
	g := startGateway(t)
	r := g.repo(t, "bkt", "")
	src := memDev(t, 4<<20)
	fillVolume(t, src, rng)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)

	o := g.options("bkt", "")
	o.Endpoint = slowProxy(t, g.Addr, 20*time.Millisecond)
	slow, err := NewS3(ctx, o)
	require.NoError(t, err)
	rs, err := OpenRepo(ctx, slow, Options{})
	require.NoError(t, err)
	defer rs.Close()

	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	im, err := OpenLazy(dctx, rs, res.Manifest.ID, LazyOptions{Prefetch: -1})
	require.NoError(t, err)
	a, b := make([]byte, 4096), make([]byte, 4096)
	for range 10 {
		off := rng.Int64N(src.Size()/4096) * 4096
		_, err := im.ReadAt(b, off)
		require.NoError(t, err)
		_, err = src.ReadAt(a, off)
		require.NoError(t, err)
		require.Equal(t, a, b)
	}
	require.NoError(t, dctx.Err())
	require.NoError(t, im.Close())

	cctx, cancel2 := context.WithCancel(ctx)
	im2, err := OpenLazy(cctx, rs, res.Manifest.ID, LazyOptions{})
	require.NoError(t, err)
	defer im2.Close()
	cancel2()
	var dataOff int64 = -1
	for i, h := range res.Manifest.Blocks {
		if !h.IsZero() {
			dataOff = int64(i) * (64 << 10)
			break
		}
	}
	_, err = im2.ReadAt(b, dataOff)
	require.ErrorIs(t, err, context.Canceled)
	require.True(t, errors.Is(err, blockdev.ErrIO))
}

// TestS3Credentials: without explicit keys, credentials come from the AWS
// environment variables, else from a profile in a credentials file.
func TestS3Credentials(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	g.makeBucket(t, "creds")
	o := g.options("creds", "")
	o.AccessKey, o.SecretKey = "", ""

	t.Setenv("AWS_ACCESS_KEY_ID", archivetest.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", archivetest.SecretKey)
	be, err := NewS3(ctx, o)
	require.NoError(t, err)
	r, err := Create(ctx, be, Options{})
	require.NoError(t, err)
	r.Close()

	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	o.ProfileFile = filepath.Join(t.TempDir(), "credentials")
	o.Profile = "backup"
	require.NoError(t, os.WriteFile(o.ProfileFile, []byte("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n"+
		"[backup]\naws_access_key_id = "+archivetest.AccessKey+"\naws_secret_access_key = "+archivetest.SecretKey+"\n"), 0o600))
	be, err = NewS3(ctx, o)
	require.NoError(t, err)
	r, err = OpenRepo(ctx, be, Options{})
	require.NoError(t, err)
	r.Close()

	o.Profile = "default" // wrong keys: refused by the server
	_, err = NewS3(ctx, o)
	require.Error(t, err)
}

// TestS3TLS: a gateway serving HTTPS with a self-signed certificate is
// refused unless its certificate is trusted (CAFile) or verification is
// skipped.
func TestS3TLS(t *testing.T) {
	blockdevtest.CheckLeaks(t)
	ctx := context.Background()
	if _, err := archivetest.GatewayPath(); err != nil {
		t.Skip(err)
	}
	g, err := archivetest.StartGatewayTLS(filepath.Join(t.TempDir(), "s3"))
	require.NoError(t, err)
	t.Cleanup(g.Kill)
	require.NoError(t, g.MakeBucket(ctx, "tls"))
	o := S3Options{Endpoint: g.Endpoint(), Bucket: "tls", PathStyle: true, AccessKey: archivetest.AccessKey,
		SecretKey: archivetest.SecretKey, MaxRetries: 1}
	_, err = NewS3(ctx, o)
	require.ErrorContains(t, err, "certificate")
	o.CAFile = g.CertFile() // trusted as a CA
	_, err = NewS3(ctx, o)
	require.NoError(t, err)
	o.CAFile, o.InsecureSkipVerify = "", true
	be, err := NewS3(ctx, o)
	require.NoError(t, err)
	r, err := Create(ctx, be, Options{})
	require.NoError(t, err)
	defer r.Close()
	src := memDev(t, 1<<20)
	_, err = src.WriteAt([]byte("over TLS"+string(make([]byte, 4088))), 0)
	require.NoError(t, err)
	res, err := r.Backup(ctx, src, BackupOptions{})
	require.NoError(t, err)
	dst := memDev(t, 1<<20)
	_, err = r.Restore(ctx, res.Manifest.ID, dst, RestoreOptions{})
	require.NoError(t, err)
	requireSame(t, src, dst, src.Size())
}
