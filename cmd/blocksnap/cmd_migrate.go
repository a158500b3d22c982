package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

var cmdMigrate = &command{
	name: "migrate",
	examples: []string{
		"blocksnap migrate --origin disk.img --store store.img --to store-v2.img",
		"blocksnap migrate --origin /dev/vg0/vm1 --store /dev/vg0/vm1-snaps --to /dev/vg0/vm1-snaps2",
	},
	summary: "convert a store of an older format into a new store device (the old store is only read)",
	long: "A store written by an older blocksnap (format version 1, which kept its index in memory and in journal " +
		"checkpoints) is refused by every other command. migrate reads it, and writes the same volumes, snapshots, clones " +
		"and data into a new store of the current format on --to, whose superblock it writes last: an interrupted " +
		"migrate leaves the old store as it was and no store on --to. A missing --to file is created with the size " +
		"the new store needs (or --size). Then use --to as the store.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fl)
		to := fl.String("to", "", "new store `PATH` (file or block device); what it holds is lost")
		var size sizeFlag
		fl.Var(&size, "size", "create a missing --to file of `SIZE` (default: the least the new store needs)")
		required(fl, "to")
		return func(e *env, _ []string) error { return migrate(e, sf, *to, size) }
	},
}

func migrate(e *env, sf *storeFlags, to string, size sizeFlag) (err error) {
	o, old, err := openDevices(sf.origin, sf.store, inspect)
	if err != nil {
		return err
	}
	defer o.Close()
	defer old.Close()
	if _, serr := os.Stat(to); errors.Is(serr, fs.ErrNotExist) {
		n := size.n
		if !size.set {
			if n, err = snapshot.MigrateSize(o, old, snapshot.Options{}); err != nil {
				return err
			}
		}
		d, err := blockdev.Create(to, n, blockdev.FileOptions{})
		if err != nil {
			return err
		}
		if err := d.Close(); err != nil {
			return err
		}
		defer removeOnError(&err, to)
	}
	if a, err := os.Stat(sf.store); err == nil {
		if b, err := os.Stat(to); err == nil && os.SameFile(a, b) {
			return usagef("--store and --to are the same file %s: migrate writes a new store device", to)
		}
	}
	dst, err := blockdev.Open(to, blockdev.FileOptions{})
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	defer dst.Close()
	err = snapshot.Migrate(o, blockdev.ReadOnly(old), dst, snapshot.Options{})
	if errors.Is(err, snapshot.ErrLocked) {
		return inUse(e.ctx, "store", sf.store, sf.controlPath(), inUseAdvice, err)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "migrated %s into %s: use --store %s from now on\n", sf.store, to, to)
	return nil
}

// removeOnError removes path, a file the command created, if *err is set
// when the command returns.
func removeOnError(err *error, path string) {
	if *err != nil {
		os.Remove(path)
	}
}
