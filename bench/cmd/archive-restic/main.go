// Command archive-restic backs up one volume image with blocksnap's archive
// package and with restic, side by side, to the same local versitygw S3
// server: a full backup, then an incremental after the same 5% of random
// 4 KiB blocks changed. It prints the time and the bytes each stored.
//
//	go run ./bench/cmd/archive-restic                 # 1 GiB volume, in $TMPDIR
//	go run ./bench/cmd/archive-restic -size 256MiB -block 16384 -chunk 16384 -dir /mnt/fast
//
// Needs versitygw (go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)
// and restic (Debian package restic) on PATH.
//
// The volume is the origin of a blocksnap snapshot store on a file; restic
// reads that file (origin.img) while blocksnap backs up the snapshot taken
// at the same moment, so both back up the same bytes. blocksnap's repository
// is encrypted too (restic's always is) and both compress with zstd.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/blocksnap/blocksnap/archive"
	"github.com/blocksnap/blocksnap/archive/archivetest"
	"github.com/blocksnap/blocksnap/bench"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

func main() {
	sizeFlag := flag.String("size", "1GiB", "volume size (KiB, MiB, GiB suffixes)")
	block := flag.Int("block", archive.DefaultBlockSize, "archive block size in bytes")
	dir := flag.String("dir", "", "directory for the volume and the S3 server's data (default $TMPDIR)")
	change := flag.Float64("change", 0.05, "fraction of 4 KiB blocks rewritten before the incremental")
	chunk := flag.Int("chunk", 0, "the snapshot store's chunk size in bytes, the unit its Diff reports (0: the default, 64 KiB)")
	flag.Parse()
	size, err := parseSize(*sizeFlag)
	if err != nil {
		log.Fatal(err)
	}
	if err := run(context.Background(), size, *block, *chunk, *dir, *change); err != nil {
		log.Fatal(err)
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	for suf, m := range map[string]int64{"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30} {
		if v, ok := strings.CutSuffix(s, suf); ok {
			s, mult = v, m
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

type row struct {
	tool, phase string
	took        time.Duration
	added       int64
}

func run(ctx context.Context, size int64, block, chunk int, dir string, change float64) error {
	if _, err := exec.LookPath("restic"); err != nil {
		return fmt.Errorf("restic not installed (apt-get install restic): %w", err)
	}
	work, err := os.MkdirTemp(dir, "archive-restic-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	gw, err := archivetest.StartGateway(filepath.Join(work, "s3"))
	if err != nil {
		return err
	}
	defer gw.Kill()
	if err := gw.MakeBucket(ctx, "cmp"); err != nil {
		return err
	}

	// The volume: a snapshot store's origin on origin.img.
	imgPath := filepath.Join(work, "origin.img")
	origin, err := blockdev.Create(imgPath, size, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer origin.Close()
	storeDev, err := blockdev.Create(filepath.Join(work, "store.img"), 2*size+64<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer storeDev.Close()
	st, err := snapshot.Format(origin, storeDev, snapshot.Options{ChunkSize: int64(chunk)})
	if err != nil {
		return err
	}
	defer st.Close()
	live := st.Origin()
	defer live.Close()
	if err := bench.FillArchiveVolume(live, 1); err != nil {
		return err
	}

	be, err := archive.NewS3(ctx, archive.S3Options{Endpoint: gw.Endpoint(), Bucket: "cmp", Prefix: "blocksnap",
		PathStyle: true, AccessKey: archivetest.AccessKey, SecretKey: archivetest.SecretKey})
	if err != nil {
		return err
	}
	repo, err := archive.Create(ctx, be, archive.Options{BlockSize: block, Passphrase: []byte("benchmark")})
	if err != nil {
		return err
	}
	defer repo.Close()
	restic := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "restic", append([]string{"--quiet"}, args...)...)
		cmd.Env = append(os.Environ(), "RESTIC_REPOSITORY=s3:"+gw.Endpoint()+"/cmp/restic", "RESTIC_PASSWORD=benchmark",
			"AWS_ACCESS_KEY_ID="+archivetest.AccessKey, "AWS_SECRET_ACCESS_KEY="+archivetest.SecretKey,
			"RESTIC_CACHE_DIR="+filepath.Join(work, "restic-cache"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("restic %s: %w\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := restic("init"); err != nil {
		return err
	}
	stored := func(prefix string) int64 {
		var n int64
		filepath.WalkDir(filepath.Join(gw.Dir, "cmp", prefix), func(_ string, e os.DirEntry, err error) error {
			if err == nil && !e.IsDir() {
				if info, ierr := e.Info(); ierr == nil {
					n += info.Size()
				}
			}
			return nil
		})
		return n
	}
	var rows []row
	measure := func(tool, phase, prefix string, fn func() error) error {
		before := stored(prefix)
		t0 := time.Now()
		if err := fn(); err != nil {
			return err
		}
		rows = append(rows, row{tool, phase, time.Since(t0), stored(prefix) - before})
		return nil
	}

	var parent string
	var parentSnap *snapshot.Volume
	for _, phase := range []string{"full", "incremental"} {
		if phase == "incremental" {
			n, err := bench.ChangeArchiveVolume(live, change, 2)
			if err != nil {
				return err
			}
			fmt.Printf("changed %d random 4 KiB blocks (%.1f%% of the volume)\n", n, 100*change)
		}
		if err := live.Flush(); err != nil {
			return err
		}
		snap, err := st.CreateSnapshot(phase, live)
		if err != nil {
			return err
		}
		if err := measure("blocksnap", phase, "blocksnap", func() error {
			res, err := repo.BackupSnapshot(ctx, st, snap, parentSnap, archive.BackupOptions{Parent: parent})
			if err == nil {
				parent = res.Manifest.ID
				fmt.Printf("blocksnap %s: %s\n", phase, res.Progress)
			}
			return err
		}); err != nil {
			return err
		}
		parentSnap = snap
		if err := measure("restic", phase, "restic", func() error { return restic("backup", imgPath) }); err != nil {
			return err
		}
	}
	fmt.Printf("\nvolume %d MiB, archive block size %d KiB, store chunk %d KiB, versitygw on loopback\n\n",
		size>>20, block>>10, cmp.Or(chunk, 64<<10)>>10)
	fmt.Println("| tool | backup | time | bytes stored (added) |")
	fmt.Println("|---|---|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %.2f s | %d (%.1f MiB) |\n", r.tool, r.phase, r.took.Seconds(), r.added, float64(r.added)/(1<<20))
	}
	inc := func(tool string) row {
		for _, r := range rows {
			if r.tool == tool && r.phase == "incremental" {
				return r
			}
		}
		return row{}
	}
	b, r := inc("blocksnap"), inc("restic")
	fmt.Printf("\nincremental: blocksnap %.1fx faster than restic, %.2fx its bytes stored\n",
		r.took.Seconds()/b.took.Seconds(), float64(b.added)/float64(r.added))
	return nil
}
