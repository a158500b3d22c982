// Archive: back a live volume up to S3 and restore it, in full and at once.
// A goroutine writes to a volume while it is snapshotted and backed up in
// full, then again for an incremental that reads only what changed; the
// incremental is restored to a file and verified, then opened lazily as the
// source of a clone that is read before its hydration has finished
// (instant restore).
//
//	go run ./examples/archive                          # a local versitygw if installed, else a directory
//	go run ./examples/archive -to s3://bucket/prefix   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... from the environment
//	go run ./examples/archive -to /mnt/nas/backups     # a local directory repository
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/blocksnap/blocksnap/archive"
	"github.com/blocksnap/blocksnap/archive/archivetest"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/snapshot"
)

const volumeSize = 64 << 20

func main() {
	to := flag.String("to", "", "repository: s3://BUCKET/PREFIX or a directory (default: a local versitygw, else a temporary directory)")
	flag.Parse()
	dir, err := os.MkdirTemp("", "blocksnap-archive")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := run(context.Background(), os.Stdout, dir, *to); err != nil {
		log.Fatal(err)
	}
}

// backend opens the repository's backend: -to, or a versitygw started here,
// or a directory.
func backend(ctx context.Context, w io.Writer, dir, to string) (archive.Backend, func(), error) {
	switch {
	case strings.HasPrefix(to, "s3://"):
		bucket, prefix, err := archive.ParseS3URL(to)
		if err != nil {
			return nil, nil, err
		}
		be, err := archive.NewS3(ctx, archive.S3Options{Bucket: bucket, Prefix: prefix, PathStyle: true})
		return be, func() {}, err
	case to != "":
		be, err := archive.NewDir(to)
		return be, func() {}, err
	}
	gw, err := archivetest.StartGateway(filepath.Join(dir, "s3"))
	if errors.Is(err, archivetest.ErrNoGateway) {
		fmt.Fprintln(w, "versitygw not installed: using a local directory repository")
		be, err := archive.NewDir(filepath.Join(dir, "repo"))
		return be, func() {}, err
	}
	if err != nil {
		return nil, nil, err
	}
	fmt.Fprintf(w, "started versitygw on %s\n", gw.Addr)
	if err := gw.MakeBucket(ctx, "backups"); err != nil {
		gw.Kill()
		return nil, nil, err
	}
	be, err := archive.NewS3(ctx, archive.S3Options{Endpoint: gw.Endpoint(), Bucket: "backups", Prefix: "vm1",
		PathStyle: true, AccessKey: archivetest.AccessKey, SecretKey: archivetest.SecretKey})
	return be, gw.Kill, err
}

func run(ctx context.Context, w io.Writer, dir, to string) error {
	be, stop, err := backend(ctx, w, dir, to)
	if err != nil {
		return err
	}
	defer stop()
	repo, err := archive.OpenRepo(ctx, be, archive.Options{Passphrase: []byte("example passphrase")})
	if errors.Is(err, archive.ErrNoRepo) {
		repo, err = archive.Create(ctx, be, archive.Options{Passphrase: []byte("example passphrase")})
	}
	if err != nil {
		return err
	}
	defer repo.Close()

	origin, err := blockdev.Create(filepath.Join(dir, "origin.img"), volumeSize, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer origin.Close()
	storeDev, err := blockdev.Create(filepath.Join(dir, "store.img"), 2*volumeSize, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer storeDev.Close()
	st, err := snapshot.Format(origin, storeDev, snapshot.Options{})
	if err != nil {
		return err
	}
	defer st.Close()
	live := st.Origin()
	defer live.Close()

	// An installed system: the first half of the volume holds data.
	base := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(3, 4))
	for off := int64(0); off < volumeSize/2; off += int64(len(base)) {
		for i := range base {
			base[i] = byte('a' + rng.IntN(20)) // compressible, like most disks
		}
		if _, err := live.WriteAt(base, off); err != nil {
			return err
		}
	}

	// The application writes while we back up; it ticks every 500 writes.
	appCtx, stopApp := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var appErr error
	tick := make(chan struct{})
	wg.Go(func() { appErr = application(appCtx, live, tick) })
	defer func() { stopApp(); wg.Wait() }()

	<-tick
	mon, err := st.CreateSnapshot("mon", live)
	if err != nil {
		return err
	}
	full, err := repo.BackupSnapshot(ctx, st, mon, nil, archive.BackupOptions{Volume: "vm1"})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "full backup %s of snapshot mon: %s\n", full.Manifest.ID, full.Progress)

	<-tick
	tue, err := st.CreateSnapshot("tue", live)
	if err != nil {
		return err
	}
	stopApp()
	wg.Wait()
	if appErr != nil {
		return appErr
	}
	inc, err := repo.BackupSnapshot(ctx, st, tue, mon, archive.BackupOptions{Volume: "vm1", Parent: full.Manifest.ID})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "incremental backup %s of snapshot tue (parent %s): %s\n", inc.Manifest.ID, full.Manifest.ID, inc.Progress)

	// Restore to a file and compare with the snapshot.
	target, err := blockdev.Create(filepath.Join(dir, "restore.img"), volumeSize, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer target.Close()
	if _, err := repo.Restore(ctx, inc.Manifest.ID, target, archive.RestoreOptions{}); err != nil {
		return err
	}
	if err := sameContents(tue, target); err != nil {
		return err
	}
	fmt.Fprintln(w, "restored: restore.img equals snapshot tue byte for byte")

	return instantRestore(ctx, w, dir, repo, inc.Manifest.ID, tue)
}

// instantRestore opens the backup lazily as a clone's source, reads the
// clone while it hydrates, then lets hydration finish.
func instantRestore(ctx context.Context, w io.Writer, dir string, repo *archive.Repo, id string, want blockdev.Device) error {
	img, err := archive.Open(ctx, repo, id, dir)
	if err != nil {
		return err
	}
	defer img.Close()
	dst, err := blockdev.Create(filepath.Join(dir, "vm.img"), volumeSize, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer dst.Close()
	meta, err := blockdev.Create(filepath.Join(dir, "vm.meta"), 1<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer meta.Close()
	// Hydration starts paused here so that the reads below are certain to
	// come before it finishes; a real VM would start it at once.
	cl, err := clone.Create(img, dst, meta, clone.Options{NoHydration: true})
	if err != nil {
		return err
	}
	defer cl.Close()
	a, b := make([]byte, 64<<10), make([]byte, 64<<10)
	for _, off := range []int64{0, 1 << 20, volumeSize / 2, volumeSize - int64(len(a))} {
		if _, err := cl.ReadAt(a, off); err != nil {
			return err
		}
		if _, err := want.ReadAt(b, off); err != nil {
			return err
		}
		if !bytes.Equal(a, b) {
			return fmt.Errorf("clone differs from the snapshot at %d", off)
		}
	}
	s := cl.Status()
	fmt.Fprintf(w, "instant restore: read the clone with %d of %d regions hydrated (%d blocks fetched on demand)\n",
		s.Hydrated, s.Regions, img.Stats().Misses)
	cl.Resume()
	if err := cl.Wait(ctx); err != nil {
		return err
	}
	if err := sameContents(want, cl); err != nil {
		return err
	}
	fmt.Fprintf(w, "hydrated: the clone equals snapshot tue (%s)\n", cl.Status())
	return nil
}

// application writes 4 KiB blocks at random until stopped, and sends on
// tick (without blocking) after every 500 writes.
func application(ctx context.Context, d blockdev.Device, tick chan<- struct{}) error {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4096)
	for i := 1; ctx.Err() == nil; i++ {
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if _, err := d.WriteAt(buf, rng.Int64N(d.Size()/4096)*4096); err != nil {
			return err
		}
		if i%500 == 0 {
			select {
			case tick <- struct{}{}:
			case <-ctx.Done():
			}
		}
	}
	return nil
}

func sameContents(a, b blockdev.Device) error {
	p, q := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < a.Size(); off += int64(len(p)) {
		if _, err := a.ReadAt(p, off); err != nil {
			return err
		}
		if _, err := b.ReadAt(q, off); err != nil {
			return err
		}
		if !bytes.Equal(p, q) {
			return fmt.Errorf("contents differ in the MiB at %d", off)
		}
	}
	return nil
}
