package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
)

// The pool commands: blank volumes, resize and import.

var cmdCreate = &command{
	name: "create", args: "NAME", lo: 1, hi: 1,
	examples: []string{
		"blocksnap create data1 --size 2GiB --store pool.img",
		"blocksnap create scratch --size 100GiB --origin disk.img --store store.img",
	},
	summary: "create a blank thin volume of --size bytes: it reads as zeros and takes store space only where written",
	long: "The size is a whole number of volume blocks, at most the store's largest volume size (fixed at format). " +
		"A running serve exports the new volume at once.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		var size sizeFlag
		fs.Var(&size, "size", "the volume's `SIZE`")
		required(fs, "size")
		js := fs.Bool("json", false, "print the new volume as JSON")
		return func(e *env, pos []string) error {
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpCreate, Name: pos[0], Size: size.n}, &v); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, v)
			}
			_, err := fmt.Fprintf(e.stdout, "created volume %s (%s, uuid %s)\n", v.Name, human(v.Size), v.UUID)
			return err
		}
	},
}

var cmdResize = &command{
	name: "resize", args: "NAME", lo: 1, hi: 1,
	examples: []string{
		"blocksnap resize vm1 --size 40GiB --origin disk.img --store store.img",
		"blocksnap resize data1 --size 1GiB --shrink --store pool.img",
	},
	summary: "change the size of a clone or blank volume (smaller only with --shrink, which discards the tail)",
	long: "A grown range reads as zeros. A shrink frees the tail's store space unless a snapshot still needs it; " +
		"snapshots keep the size they were taken at. The origin's size is its device's. " +
		"NBD clients of a running serve see the new size when they reconnect.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		var size sizeFlag
		fs.Var(&size, "size", "the new `SIZE`")
		required(fs, "size")
		shrink := fs.Bool("shrink", false, "allow a smaller size, discarding everything past it")
		js := fs.Bool("json", false, "print the resized volume as JSON")
		return func(e *env, pos []string) error {
			var v control.Volume
			r := control.Request{Op: control.OpResize, Name: pos[0], Size: size.n, Shrink: *shrink}
			if err := runOp(e, sf, readWrite, r, &v); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, v)
			}
			_, err := fmt.Fprintf(e.stdout, "resized %s to %s\n", v.Name, human(v.Size))
			return err
		}
	},
}

var cmdImport = &command{
	name: "import", args: "NAME FILE|nbd://URI", lo: 2, hi: 2,
	examples: []string{
		"blocksnap import golden debian.raw --store pool.img",
		"blocksnap import golden nbd://images:10809/debian --store pool.img",
	},
	summary: "make a new volume from a raw image file, block device or NBD export, copying only its data",
	long: "Holes the source reports and chunks that read as zeros take no store space, so a sparse image costs " +
		"only its data. The volume appears under its name only once the copy is complete and durable; an import " +
		"cut short by a crash shows as import/NAME until the store's next open deletes it. Against a running " +
		"serve, the serve reads the source (give a path on its machine).",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print the new volume as JSON")
		return func(e *env, pos []string) error {
			src := pos[1]
			if !isNBD(src) {
				abs, err := filepath.Abs(src)
				if err != nil {
					return err
				}
				src = abs
			}
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpImport, Name: pos[0], Source: src}, &v); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, v)
			}
			_, err := fmt.Fprintf(e.stdout, "imported %s as volume %s (%s, uuid %s)\n", pos[1], v.Name, human(v.Size), v.UUID)
			return err
		}
	},
}

// created answers a request that made volume v (or failed with err): v
// goes to the serve's exports, or is closed.
func (o *ops) created(v *snapshot.Volume, err error) (any, error) {
	if err != nil {
		return nil, err
	}
	info := toJSON(v.Info(), nameMap(o.st))
	if o.onCreate != nil {
		return info, o.onCreate(v)
	}
	return info, v.Close()
}

// importVolume imports the source src (a path or NBD URI) as volume name.
func (o *ops) importVolume(ctx context.Context, name, src string) (any, error) {
	if !isNBD(src) && !filepath.IsAbs(src) {
		return nil, fmt.Errorf("%w: import source %q is not an absolute path", snapshot.ErrBadOptions, src)
	}
	dev, err := openSource(ctx, src, 0)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	var opts snapshot.ImportOptions
	if o.progress != nil {
		p := o.progress("import " + name)
		defer p.done()
		opts.Progress = p.update
	}
	v, err := o.st.Import(ctx, name, dev, opts)
	return o.created(v, err)
}
