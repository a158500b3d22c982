package archive

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

const (
	gwAccess = "blocksnaptest"
	gwSecret = "blocksnaptestsecret"
)

// testSeed returns BLOCKSNAP_SEED if set, else a random seed, and logs it.
func testSeed(t testing.TB) uint64 {
	seed := rand.Uint64()
	if s := os.Getenv("BLOCKSNAP_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, "BLOCKSNAP_SEED")
		seed = v
	}
	t.Logf("seed %d (replay with BLOCKSNAP_SEED=%d)", seed, seed)
	return seed
}

// gateway is a real versitygw S3 server on a loopback port, its data in a
// temporary directory.
type gateway struct {
	t    testing.TB
	bin  string
	dir  string
	addr string
	mu   sync.Mutex // guards cmd
	cmd  *exec.Cmd
}

func versitygwPath(t testing.TB) string {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	home, _ := os.UserHomeDir()
	p := filepath.Join(home, "go", "bin", "versitygw")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	t.Skip("versitygw not installed (go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)")
	return ""
}

func startGateway(t testing.TB) *gateway {
	bin := versitygwPath(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	g := &gateway{t: t, bin: bin, dir: t.TempDir(), addr: addr}
	g.start()
	t.Cleanup(g.kill)
	return g
}

func (g *gateway) start() {
	g.mu.Lock()
	defer g.mu.Unlock()
	cmd := exec.Command(g.bin, "--access", gwAccess, "--secret", gwSecret, "--port", g.addr, "posix", g.dir)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	require.NoError(g.t, cmd.Start())
	g.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", g.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("versitygw did not listen on %s: %v", g.addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill stops the server hard (SIGKILL) and waits for it.
func (g *gateway) kill() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cmd == nil {
		return
	}
	g.cmd.Process.Kill()
	g.cmd.Wait()
	g.cmd = nil
}

func (g *gateway) client(t testing.TB) *minio.Client {
	c, err := minio.New(g.addr, &minio.Options{Creds: credentials.NewStaticV4(gwAccess, gwSecret, ""), BucketLookup: minio.BucketLookupPath})
	require.NoError(t, err)
	return c
}

func (g *gateway) makeBucket(t testing.TB, bucket string) {
	require.NoError(t, g.client(t).MakeBucket(context.Background(), bucket, minio.MakeBucketOptions{}))
}

func (g *gateway) options(bucket, prefix string) S3Options {
	return S3Options{Endpoint: "http://" + g.addr, Bucket: bucket, Prefix: prefix, PathStyle: true,
		AccessKey: gwAccess, SecretKey: gwSecret, MaxRetries: 1}
}

// backend returns an S3 backend on a fresh bucket.
func (g *gateway) backend(t testing.TB, bucket, prefix string) *S3 {
	g.makeBucket(t, bucket)
	be, err := NewS3(context.Background(), g.options(bucket, prefix))
	require.NoError(t, err)
	return be
}

// objectPath is where versitygw keeps key's object on disk.
func (g *gateway) objectPath(bucket, key string) string {
	return filepath.Join(g.dir, bucket, filepath.FromSlash(key))
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
	d, err := blockdev.NewMem(size, 4096)
	require.NoError(t, err)
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

// slowProxy forwards TCP connections to target, sleeping delay before
// every chunk it forwards from the server.
func slowProxy(t testing.TB, target string, delay time.Duration) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	done := make(chan struct{})
	t.Cleanup(func() { close(done); l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			wg.Go(func() { io.Copy(s, c); s.Close() })
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 16<<10)
				for {
					n, err := s.Read(buf)
					if n > 0 {
						select {
						case <-time.After(delay):
						case <-done:
							return
						}
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
			wg.Go(func() { <-done; c.Close(); s.Close() })
		}
	})
	return fmt.Sprintf("http://%s", l.Addr())
}
