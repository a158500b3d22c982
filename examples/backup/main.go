// Backup: a live volume written by a running application, hourly-style
// snapshots, a full export then incrementals (the diff stream, as `zfs
// send -i` or `rbd export-diff`), and a restore onto a blank file that is
// verified equal to the last snapshot.
//
//	go run ./examples/backup
//
// The same with the command line, on a store that `blocksnap serve` or
// your program keeps:
//
//	blocksnap export-diff hour-00 --origin O --store S -o full.bsd
//	blocksnap export-diff --from hour-00 hour-01 --origin O --store S -o incr-01.bsd
//	blocksnap apply-diff --target restore.img -i full.bsd
//	blocksnap apply-diff --target restore.img -i incr-01.bsd
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

const hours = 4

func main() {
	dir, err := os.MkdirTemp("", "blocksnap-backup")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := run(context.Background(), os.Stdout, dir); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, w io.Writer, dir string) error {
	origin, err := blockdev.Create(filepath.Join(dir, "origin.img"), 32<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer origin.Close()
	storeDev, err := blockdev.Create(filepath.Join(dir, "store.img"), 64<<20, blockdev.FileOptions{})
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

	// The application: writes 4 KiB blocks at random until stopped.
	appCtx, stopApp := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var appErr error
	tick := make(chan struct{}, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		appErr = application(appCtx, live, tick)
		stopApp()
	}()

	var streams []string
	var prev *snapshot.Volume
	for h := range hours {
		// An hour of work, compressed: wait for the application to make
		// some progress, then snapshot the running volume.
		select {
		case <-tick:
		case <-appCtx.Done():
			wg.Wait()
			return errors.Join(appCtx.Err(), appErr)
		}
		snap, err := st.CreateSnapshot(fmt.Sprintf("hour-%02d", h), live)
		if err != nil {
			stopApp()
			wg.Wait()
			return err
		}
		defer snap.Close()
		path := filepath.Join(dir, fmt.Sprintf("backup-%02d.bsd", h))
		tot, err := export(ctx, st, prev, snap, path)
		if err != nil {
			stopApp()
			wg.Wait()
			return err
		}
		kind := "full export"
		if prev != nil {
			kind = "incremental export from " + prev.Info().Name
		}
		fmt.Fprintf(w, "%s: %s, %d records, %d KiB data, %d KiB zeros\n",
			snap.Info().Name, kind, tot.Records, tot.DataBytes>>10, tot.ZeroBytes>>10)
		streams = append(streams, path)
		prev = snap
	}
	stopApp()
	wg.Wait()
	if appErr != nil {
		return appErr
	}

	// Restore: the full export then each incremental, onto a blank file.
	restorePath := filepath.Join(dir, "restore.img")
	restore, err := blockdev.Create(restorePath, live.Size(), blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer restore.Close()
	for _, path := range streams {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		res, err := diffstream.Apply(ctx, f, restore, diffstream.ApplyOptions{StatePath: diffstream.DefaultStatePath(restorePath)})
		f.Close()
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "restored %s: the target is now at %s\n", filepath.Base(path), res.Header.To.Name)
	}
	if err := equal(prev, restore); err != nil {
		return err
	}
	fmt.Fprintf(w, "verified: the restored file equals snapshot %s byte for byte\n", prev.Info().Name)
	return st.Check()
}

// application writes random blocks to the volume until ctx ends. Every
// 64 writes it signals tick (without waiting for anyone to listen).
func application(ctx context.Context, v *snapshot.Volume, tick chan<- struct{}) error {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4096)
	blocks := v.Size() / 4096
	for n := 1; ctx.Err() == nil; n++ {
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := v.WriteAt(buf, rng.Int64N(blocks)*4096); err != nil {
			return err
		}
		if n%64 == 0 {
			if err := v.Flush(); err != nil {
				return err
			}
			select {
			case tick <- struct{}{}:
			default:
			}
		}
	}
	return nil
}

// export writes the stream from prev (nil: a full export) to snap.
func export(ctx context.Context, st *snapshot.Store, prev, snap *snapshot.Volume, path string) (diffstream.Totals, error) {
	f, err := os.Create(path)
	if err != nil {
		return diffstream.Totals{}, err
	}
	defer f.Close()
	tot, err := st.ExportDiff(ctx, f, prev, snap, snapshot.ExportOptions{})
	if err != nil {
		return tot, err
	}
	return tot, f.Sync()
}

// equal checks that the restored device holds the snapshot.
func equal(a, b blockdev.Device) error {
	eq, off, err := blockdev.Equal(context.Background(), a, b)
	if err != nil {
		return err
	}
	if !eq {
		return fmt.Errorf("restore differs from the snapshot at byte %d", off)
	}
	return nil
}
