package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

var cmdFormat = &command{
	name: "format",
	examples: []string{
		"blocksnap format --origin disk.img --store store.img --size 20GiB",
		"blocksnap format --origin /dev/vg0/vm1 --store /dev/vg0/vm1-snaps --chunk-size 16KiB",
		"blocksnap format --store pool.img --size 100GiB",
	},
	summary: "create an empty store for an origin, or without --origin a pool of volumes only; --size creates missing files (the origin's contents are kept)",
	long: "Refuses an origin or store that holds a qcow2, VMDK, VHD, VHDX or VDI image (convert it to raw " +
		"with qemu-img convert first), a size that is not a whole number of 4KiB blocks, an existing file " +
		"whose size differs from --size (files are never resized), one file given as both origin and store, " +
		"and a store that already holds a blocksnap store (unless --force). A failed format removes the files it created.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fl)
		var chunk, size, storeSize, maxVol sizeFlag
		fl.Var(&chunk, "chunk-size", "copy-on-write chunk `SIZE`, a power of two from 4KiB to 1MiB (default 64KiB)")
		fl.Var(&maxVol, "max-volume-size", "largest `SIZE` of any volume (create, resize, import); default 16TiB or the origin's size")
		fl.Var(&size, "size", "create missing files of `SIZE` (the store too, unless --store-size)")
		fl.Var(&storeSize, "store-size", "`SIZE` of a missing store file (default: --size)")
		force := fl.Bool("force", false, "format even if the store already holds a blocksnap store")
		return func(e *env, _ []string) error {
			if !storeSize.set {
				storeSize = size
			}
			return format(e, sf, chunk, size, storeSize, maxVol, *force)
		}
	},
}

// formatBlock is the block size of the files format creates: sizes must
// be whole blocks.
const formatBlock = 4096

func format(e *env, sf *storeFlags, chunk, size, storeSize, maxVol sizeFlag, force bool) (err error) {
	var created []string
	defer func() {
		if err != nil {
			for _, p := range created {
				os.Remove(p)
			}
		}
	}()
	for _, p := range []struct {
		role, path, flag string
		size             sizeFlag
	}{{"origin", sf.origin, "--size", size}, {"store", sf.store, "--store-size", storeSize}} {
		if p.path == "" {
			continue // no origin: a pool of volumes only
		}
		fi, err := os.Stat(p.path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if !p.size.set {
				return fmt.Errorf("%s %s does not exist (give --size to create it)", p.role, p.path)
			}
			if p.size.n == 0 || p.size.n%formatBlock != 0 {
				return usagef("%s of %d bytes is not a whole number of %s blocks (blocksnap does not round)", p.flag, p.size.n, human(formatBlock))
			}
			d, err := blockdev.Create(p.path, p.size.n, blockdev.FileOptions{})
			if err != nil {
				return err
			}
			created = append(created, p.path)
			if err := d.Close(); err != nil {
				return err
			}
		case err != nil:
			return err
		default:
			if err := refuseImage(p.role, p.path); err != nil {
				return err
			}
			if !fi.Mode().IsRegular() {
				break
			}
			if fi.Size()%formatBlock != 0 {
				return fmt.Errorf("%s %s is %d bytes, not a whole number of %s blocks (truncate or convert it; blocksnap does not round)", p.role, p.path, fi.Size(), human(formatBlock))
			}
			if p.size.set && p.size.n != fi.Size() {
				return fmt.Errorf("%s %s exists with %d bytes, not the %d of %s (it is not resized: drop %s to use it as it is)", p.role, p.path, fi.Size(), p.size.n, p.flag, p.flag)
			}
		}
	}
	if a, err := os.Stat(sf.origin); err == nil {
		if b, err := os.Stat(sf.store); err == nil && os.SameFile(a, b) {
			return usagef("--origin and --store are the same file %s: the store needs a device of its own", sf.store)
		}
	}
	o, s, err := openDevices(sf.origin, sf.store, readWrite)
	if err != nil {
		return err
	}
	defer closeFile(o)
	defer s.Close()
	if !force {
		if st, err := snapshot.Open(device(o), s, snapshot.Options{ReadOnly: true}); err == nil {
			n := len(st.List())
			st.Close()
			return fmt.Errorf("%s already holds a blocksnap store with %d volumes (use --force to reformat and lose them)", sf.store, n)
		} else if errors.Is(err, snapshot.ErrOldFormat) {
			return fmt.Errorf("%s already holds a blocksnap store of an older format (convert it with blocksnap migrate, or use --force to reformat and lose it)", sf.store)
		}
	}
	st, err := snapshot.Format(device(o), s, snapshot.Options{ChunkSize: chunk.n, MaxVolumeSize: maxVol.n, TakeOver: sf.takeOver})
	if errors.Is(err, snapshot.ErrLocked) {
		return inUse(e.ctx, "store", sf.store, sf.controlPath(), inUseAdvice, err)
	}
	if err != nil {
		return err
	}
	if err := st.Close(); err != nil {
		return err
	}
	if err := s.Flush(); err != nil {
		return err
	}
	cs := chunk.n
	if cs == 0 {
		cs = 64 << 10
	}
	if o == nil {
		_, err = fmt.Fprintf(e.stdout, "formatted store %s (%s) without an origin, chunk size %s, volumes up to %s\n",
			sf.store, human(s.Size()), human(cs), human(st.MaxVolumeSize()))
		return err
	}
	_, err = fmt.Fprintf(e.stdout, "formatted store %s (%s) for origin %s (%s), chunk size %s\n",
		sf.store, human(s.Size()), sf.origin, human(o.Size()), human(cs))
	return err
}

// imageFormats are virtual disk formats by their magic number: a file in
// one of them is not a raw disk, and formatting it would treat its
// metadata as data.
var imageFormats = []struct {
	name  string
	off   int64 // from the start; negative: from the end
	magic []byte
}{
	{"qcow2", 0, []byte("QFI\xfb")},
	{"VMDK", 0, []byte("KDMV")},
	{"VMDK (descriptor)", 0, []byte("# Disk DescriptorFile")},
	{"VHDX", 0, []byte("vhdxfile")},
	{"VHD", 0, []byte("conectix")},
	{"VHD", -512, []byte("conectix")},
	{"VDI", 0x40, []byte{0x7f, 0x10, 0xda, 0xbe}},
}

// refuseImage fails when path holds a virtual disk image rather than a raw
// disk, saying how to convert it.
func refuseImage(role, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	for _, m := range imageFormats {
		off := m.off
		if off < 0 {
			off += end
		}
		if off < 0 || off+int64(len(m.magic)) > end {
			continue
		}
		buf := make([]byte, len(m.magic))
		if _, err := f.ReadAt(buf, off); err != nil {
			return err
		}
		if bytes.Equal(buf, m.magic) {
			return fmt.Errorf("%s %s is a %s image, not a raw disk; convert it first: qemu-img convert -O raw %s %s.raw", role, path, m.name, path, path)
		}
	}
	return nil
}
