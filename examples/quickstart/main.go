// Quickstart: a snapshot store on two temporary files, in a few seconds and
// with no setup.
//
//	go run ./examples/quickstart
//
// It formats a store for an origin (the live disk), writes to the disk,
// takes a snapshot, writes again, reads both views, and prints the diff
// between the snapshot and the live disk and a short space summary.
package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

func main() {
	dir, err := os.MkdirTemp("", "blocksnap-quickstart")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := run(os.Stdout, dir); err != nil {
		log.Fatal(err)
	}
}

func run(w io.Writer, dir string) error {
	// The origin holds the live volume in place (any Device: a file, a
	// block device, RAM); the store holds snapshots and metadata.
	origin, err := blockdev.Create(filepath.Join(dir, "origin.img"), 64<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer origin.Close()
	store, err := blockdev.Create(filepath.Join(dir, "store.img"), 32<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer store.Close()

	st, err := snapshot.Format(origin, store, snapshot.Options{}) // 64 KiB chunks
	if err != nil {
		return err
	}
	defer st.Close()
	fmt.Fprintf(w, "formatted a store in %s (origin 64 MiB, store 32 MiB)\n", dir)

	// Every volume is a blockdev.Device: write the live disk through it.
	disk := st.Origin()
	defer disk.Close()
	if err := put(disk, 0, "hello from version 1"); err != nil {
		return err
	}

	// O(1): no data is copied when the snapshot is taken.
	snap, err := st.CreateSnapshot("monday", disk)
	if err != nil {
		return err
	}
	defer snap.Close()
	fmt.Fprintln(w, "took snapshot \"monday\"")

	// Overwrite the first block and write somewhere new. The old contents
	// of the first chunk are copied to the store once, for every snapshot.
	if err := put(disk, 0, "hello from version 2"); err != nil {
		return err
	}
	if err := put(disk, 8<<20, "written after the snapshot"); err != nil {
		return err
	}
	if err := disk.Flush(); err != nil { // durable from here on
		return err
	}

	for _, v := range []struct {
		name string
		dev  blockdev.Device
	}{{"live disk", disk}, {"snapshot monday", snap}} {
		a, err := get(v.dev, 0)
		if err != nil {
			return err
		}
		b, err := get(v.dev, 8<<20)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%-16s block 0: %-24q at 8 MiB: %q\n", v.name+":", a, b)
	}

	fmt.Fprintln(w, "diff monday -> live:")
	var changed int64
	for x, err := range st.Diff(snap, disk) {
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "  %8d +%d bytes\n", x.Off, x.Len)
		changed += x.Len
	}
	stat, err := st.Stat("monday")
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "summary: %d KiB changed since monday; the snapshot keeps %d KiB of old data in the store\n",
		changed>>10, stat.Mapped>>10)
	return st.Check()
}

// put writes s at off, padded to one block.
func put(d blockdev.Device, off int64, s string) error {
	buf := make([]byte, d.BlockSize())
	copy(buf, s)
	_, err := d.WriteAt(buf, off)
	return err
}

// get reads the text at the start of the block at off.
func get(d blockdev.Device, off int64) (string, error) {
	buf := make([]byte, d.BlockSize())
	if _, err := d.ReadAt(buf, off); err != nil {
		return "", err
	}
	if s := bytes.TrimRight(buf, "\x00"); len(s) > 0 {
		return string(s), nil
	}
	return "(zeros)", nil
}
