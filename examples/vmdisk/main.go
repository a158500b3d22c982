// VM disks in a pool: a golden image imported from a sparse file, three
// VM clones of it, a blank data disk, a snapshot and a rollback of one
// clone, all served over NBD for QEMU or qemu-io.
//
//	go run ./examples/vmdisk [-listen 127.0.0.1:10809] [-dir DIR]
//
// then, in another terminal (see README.md):
//
//	qemu-io -f raw -r nbd://127.0.0.1:10809/vm1 -c 'read -v 1M 32'
//	qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/vm2,format=raw,if=virtio ...
//
// Clones cost nothing until written: each VM's writes go to the shared
// store, the golden image stays as it was, and any clone can be
// snapshotted and rolled back without touching the others, or reset to
// the golden snapshot (which is protected from deletion) while its VM
// stays connected.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/nbd"
	"github.com/blocksnap/blocksnap/snapshot"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:10809", "TCP address to serve NBD on")
	dir := flag.String("dir", "", "directory for golden.img and store.img (default: a temporary one, removed on exit)")
	flag.Parse()
	if *dir == "" {
		d, err := os.MkdirTemp("", "blocksnap-vmdisk")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout, *dir, *listen, nil); err != nil {
		log.Fatal(err)
	}
}

// run builds the disks and serves them until ctx ends; ready, if not nil,
// is called with the server's address once it listens (it must not block:
// connections are accepted after it returns).
func run(ctx context.Context, w io.Writer, dir, listen string, ready func(net.Addr)) error {
	// The golden image as a distribution ships it: a sparse raw file
	// with the OS at the start and holes elsewhere.
	golden, err := blockdev.Create(filepath.Join(dir, "golden.img"), 64<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer golden.Close()
	if err := put(golden, 0, "golden OS image v1"); err != nil {
		return err
	}
	// The store is a pool of volumes (no origin device): it holds every
	// VM disk, whatever its size.
	storeDev, err := blockdev.Create(filepath.Join(dir, "store.img"), 128<<20, blockdev.FileOptions{})
	if err != nil {
		return err
	}
	defer storeDev.Close()
	st, err := snapshot.Format(nil, storeDev, snapshot.Options{})
	if err != nil {
		return err
	}
	defer st.Close()

	// Import the golden image (only its data is copied: holes and zeros
	// take no store space), then freeze it as a snapshot.
	image, err := st.Import(ctx, "golden-image", golden, snapshot.ImportOptions{})
	if err != nil {
		return err
	}
	defer image.Close()
	fmt.Fprintf(w, "imported golden.img: %d MiB, %d KiB stored\n", image.Size()>>20, st.Stats().UsedBytes>>10)
	base, err := st.CreateSnapshot("golden", image)
	if err != nil {
		return err
	}
	vols := map[string]*snapshot.Volume{"golden": base}
	defer func() {
		for _, v := range vols {
			v.Close()
		}
	}()

	// Three VMs, each a writable clone that writes its own hostname.
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		vm, err := st.CreateClone(name, base)
		if err != nil {
			return err
		}
		vols[name] = vm
		if err := put(vm, 1<<20, "hostname: "+name); err != nil {
			return err
		}
	}

	// vm2 needs a bigger disk than golden's: the grown range reads as
	// zeros (its guest grows its partition).
	if err := st.Resize("vm2", 96<<20, snapshot.ResizeOptions{}); err != nil {
		return err
	}

	// A blank data disk for vm1: 2 GiB of its own size, reading as zeros
	// and taking store space only where it is written.
	data, err := st.CreateVolume("vm1-data", 2<<30)
	if err != nil {
		return err
	}
	vols["vm1-data"] = data
	if err := put(data, 0, "vm1 data disk"); err != nil {
		return err
	}

	// vm1: snapshot before an upgrade, upgrade, then roll back.
	vm1 := vols["vm1"]
	pre, err := st.CreateSnapshot("vm1-before-upgrade", vm1)
	if err != nil {
		return err
	}
	vols["vm1-before-upgrade"] = pre
	if err := put(vm1, 0, "golden OS image v2 (a broken upgrade)"); err != nil {
		return err
	}
	s, _ := get(vm1, 0)
	fmt.Fprintf(w, "vm1 after the upgrade:  %q\n", s)
	if err := st.Rollback(ctx, vm1, pre); err != nil {
		return err
	}
	s, _ = get(vm1, 0)
	fmt.Fprintf(w, "vm1 after the rollback: %q\n", s)

	// The golden snapshot is protected: a delete is refused, naming the
	// clones that depend on it.
	if err := st.Protect("golden"); err != nil {
		return err
	}
	if _, err := st.Delete("golden"); !errors.Is(err, snapshot.ErrProtected) {
		return fmt.Errorf("delete of the protected golden snapshot: %v", err)
	} else {
		fmt.Fprintf(w, "delete golden: %v\n", err)
	}

	return serve(ctx, w, listen, st, vols, ready)
}

// exports are the volumes served, in order.
var exports = []string{"golden", "vm1", "vm2", "vm3", "vm1-data", "vm1-before-upgrade"}

// serve exports the volumes and, while they are served, reimages vm3
// under a connected client, then serves until ctx ends.
func serve(ctx context.Context, w io.Writer, listen string, st *snapshot.Store, vols map[string]*snapshot.Volume, ready func(net.Addr)) error {
	srv, err := nbd.New(nbd.Options{DefaultExport: "vm1"})
	if err != nil {
		return err
	}
	for _, name := range exports {
		v := vols[name]
		// Snapshots are exported read-only: the server asks the volume
		// (blockdev.IsReadOnly).
		if err := srv.Add(nbd.Export{Name: name, Device: v, Description: v.Kind().String()}); err != nil {
			return err
		}
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }() // Serve drains and flushes every export when ctx ends
	if err := reimage(ctx, w, st, vols, l.Addr()); err != nil {
		cancel()
		<-served
		return err
	}
	for _, name := range []string{"golden", "vm1", "vm2", "vm3", "vm1-data"} {
		v := vols[name]
		a, _ := get(v, 0)
		b, _ := get(v, 1<<20)
		fmt.Fprintf(w, "%-9s %4d MiB, block 0: %-22q at 1 MiB: %q\n", name+":", v.Size()>>20, a, b)
	}
	fmt.Fprintf(w, "serving %s on nbd://%s/NAME; ^C to stop\n", strings.Join(exports, ", "), l.Addr())
	fmt.Fprintf(w, "  qemu-io -f raw -r nbd://%s/vm2 -c 'read -v 1M 16'\n", l.Addr())
	if ready != nil {
		ready(l.Addr())
	}
	if err := <-served; err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		return err
	}
	return nil
}

// reimage resets vm3 to golden while an NBD client (a VM would be one)
// is connected to it. The reset is metadata, vm3's chunks inheriting
// golden's again, under the same handle and export: the client stays
// connected and its next read returns golden's data.
func reimage(ctx context.Context, w io.Writer, st *snapshot.Store, vols map[string]*snapshot.Volume, addr net.Addr) error {
	vm, err := nbd.Dial(ctx, nbd.URI(addr, "vm3"))
	if err != nil {
		return err
	}
	defer vm.Close()
	if err := put(vm, 0, "vm3 OS, drifted"); err != nil {
		return err
	}
	s, err := get(vm, 0)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "vm3 over NBD before the reset: %q\n", s)
	if err := st.Rollback(ctx, vols["vm3"], vols["golden"]); err != nil {
		return err
	}
	if s, err = get(vm, 0); err != nil {
		return err
	}
	fmt.Fprintf(w, "vm3 over NBD after the reset:  %q (same connection)\n", s)
	return nil
}

func put(d blockdev.Device, off int64, s string) error {
	buf := make([]byte, d.BlockSize())
	copy(buf, s)
	if _, err := d.WriteAt(buf, off); err != nil {
		return err
	}
	return d.Flush()
}

func get(d blockdev.Device, off int64) (string, error) {
	buf := make([]byte, d.BlockSize())
	if _, err := d.ReadAt(buf, off); err != nil {
		return "", err
	}
	return string(bytes.TrimRight(buf, "\x00")), nil
}
