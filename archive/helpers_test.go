package archive

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/archive/archivetest"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// testSeed is the kit's seed, with a goroutine leak check: every test
// that draws a seed also checks that it stops what it starts.
func testSeed(t testing.TB) uint64 {
	t.Helper()
	blockdevtest.CheckLeaks(t)
	return blockdevtest.Seed(t)
}

// gateway wraps archivetest.Gateway for tests: one per test, killed at
// cleanup, skipped where versitygw is missing.
type gateway struct {
	*archivetest.Gateway
	t testing.TB
}

func startGateway(t testing.TB) *gateway {
	if _, err := archivetest.GatewayPath(); err != nil {
		t.Skip(err)
	}
	g, err := archivetest.StartGateway(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(g.Kill)
	return &gateway{Gateway: g, t: t}
}

func (g *gateway) start() { require.NoError(g.t, g.Start()) }
func (g *gateway) kill()  { g.Kill() }
func (g *gateway) makeBucket(t testing.TB, b string) {
	require.NoError(t, g.MakeBucket(context.Background(), b))
}
func (g *gateway) objectPath(bucket, key string) string {
	return g.ObjectPath(bucket, key)
}

func (g *gateway) options(bucket, prefix string) S3Options {
	return S3Options{Endpoint: g.Endpoint(), Bucket: bucket, Prefix: prefix, PathStyle: true,
		AccessKey: archivetest.AccessKey, SecretKey: archivetest.SecretKey, MaxRetries: 1}
}

// backend returns an S3 backend on a fresh bucket.
func (g *gateway) backend(t testing.TB, bucket, prefix string) *S3 {
	g.makeBucket(t, bucket)
	be, err := NewS3(context.Background(), g.options(bucket, prefix))
	require.NoError(t, err)
	return be
}

// fillVolume writes random data to about half of dev's 4 KiB blocks in
// runs, leaving the rest zero.
func fillVolume(t testing.TB, dev blockdev.Device, rng *rand.Rand) {
	buf := make([]byte, 64<<10)
	for off := int64(0); off < dev.Size(); off += int64(len(buf)) {
		if rng.IntN(2) == 0 {
			continue
		}
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if rng.IntN(3) == 0 { // some compressible data too
			clear(buf[len(buf)/2:])
		}
		_, err := dev.WriteAt(buf[:min(int64(len(buf)), dev.Size()-off)], off)
		require.NoError(t, err)
	}
}

// randomDev returns a memory device of size bytes, all random (no zero
// blocks, nothing compressible).
func randomDev(t testing.TB, rng *rand.Rand, size int64) *blockdev.Mem {
	d := memDev(t, size)
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	_, err := d.WriteAt(b, 0)
	require.NoError(t, err)
	return d
}

// requireSame compares two devices' contents.
func requireSame(t testing.TB, want, got blockdev.Device, size int64) {
	t.Helper()
	a, b := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(a)) {
		n := min(int64(len(a)), size-off)
		_, err := want.ReadAt(a[:n], off)
		require.NoError(t, err)
		_, err = got.ReadAt(b[:n], off)
		require.NoError(t, err)
		if string(a[:n]) != string(b[:n]) {
			for i := range n {
				if a[i] != b[i] {
					t.Fatalf("contents differ at byte %d", off+i)
				}
			}
		}
	}
}

func memDev(t testing.TB, size int64) *blockdev.Mem {
	d := blockdevtest.NewMem(t, size, 4096)
	t.Cleanup(func() { d.Close() })
	return d
}

func dirRepo(t testing.TB, o Options) (*Repo, *Dir) {
	be, err := NewDir(t.TempDir())
	require.NoError(t, err)
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	if o.Passphrase != nil && o.ScryptN == 0 {
		o.ScryptN = 1 << 10
	}
	r, err := Create(context.Background(), be, o)
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return r, be
}

// slowProxy starts a proxy to target that delays every chunk the server
// sends, and returns its URL.
func slowProxy(t testing.TB, target string, delay time.Duration) string {
	p, err := archivetest.NewSlowProxy(target, delay)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return "http://" + p.Addr
}

// repo creates a plaintext repository with 64 KiB blocks in a fresh bucket.
func (g *gateway) repo(t testing.TB, bucket, prefix string) *Repo {
	r, err := Create(context.Background(), g.backend(t, bucket, prefix), Options{BlockSize: 64 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return r
}
