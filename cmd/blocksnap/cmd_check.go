package main

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/exception"
)

var cmdCheck = &command{
	name: "check",
	examples: []string{
		"blocksnap check --origin disk.img --store store.img",
		"blocksnap check --cow /dev/vg0/snap-cow --json",
	},
	summary: "verify an engine's metadata: a snapshot store, a clone, or a dm-snapshot COW device",
	long: `Give one of:
  --origin PATH --store PATH             a snapshot store (of a running serve: its live state, through its control socket)
  --source PATH --dest PATH --meta PATH  a clone (the dm-clone model); --meta alone for one a hydrate is running on (its live state)
  --cow PATH                             a persistent dm-snapshot COW device (the Linux kernel's format); never written to
Every problem is printed; the exit status is 0 only when there is none, 1 otherwise.`,
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := &storeFlags{}
		fs.StringVar(&sf.origin, "origin", "", "origin `PATH` of a snapshot store")
		fs.StringVar(&sf.store, "store", "", "store `PATH` of a snapshot store")
		fs.StringVar(&sf.control, "control", "", "control socket `PATH` of a running serve or hydrate (default STORE.control, META.control)")
		cf := &cloneFlags{}
		fs.StringVar(&cf.source, "source", "", "source `PATH` or nbd:// URI of a clone")
		fs.StringVar(&cf.dest, "dest", "", "destination `PATH` of a clone")
		fs.StringVar(&cf.meta, "meta", "", "metadata `PATH` of a clone")
		cow := fs.String("cow", "", "COW device `PATH` of a persistent dm-snapshot")
		js := fs.Bool("json", false, "print the report as JSON")
		return func(e *env, _ []string) error {
			cf.control = sf.control
			var r control.CheckReport
			var err error
			switch {
			case *cow != "" && sf.origin == "" && sf.store == "" && cf.meta == "":
				r, err = checkCOW(*cow)
			case sf.store != "" && cf.meta == "" && *cow == "":
				err = runOp(e, sf, inspect, control.Request{Op: control.OpCheck}, &r)
			case cf.meta != "" && sf.store == "" && sf.origin == "" && *cow == "":
				r, err = checkClone(e, cf)
			default:
				return usagef("give --store (and --origin, if the store has one), or --source, --dest and --meta, or --cow")
			}
			if err != nil {
				return err
			}
			return printCheck(e, r, *js)
		}
	},
}

func printCheck(e *env, r control.CheckReport, js bool) error {
	if js {
		if err := writeJSON(e.stdout, r); err != nil {
			return err
		}
	} else if r.OK {
		what := ""
		if r.Volumes > 0 {
			what = fmt.Sprintf(" (%d volumes)", r.Volumes)
		}
		fmt.Fprintf(e.stdout, "%s %s is clean%s\n", r.Engine, r.Target, what)
	} else {
		fmt.Fprintf(e.stdout, "%s %s has %d problems:\n", r.Engine, r.Target, len(r.Problems))
		for _, p := range r.Problems {
			fmt.Fprintf(e.stdout, "  %s\n", p)
		}
	}
	if !r.OK {
		return fmt.Errorf("%s %s failed its check: %d problems (first: %s)", r.Engine, r.Target, len(r.Problems), r.Problems[0])
	}
	return nil
}

// checkClone checks the clone: the live state of the hydrate running on
// it, through its control socket, or else the clone opened read-only.
func checkClone(e *env, cf *cloneFlags) (control.CheckReport, error) {
	r := control.CheckReport{Target: cf.meta, Engine: "clone"}
	held, err := isLocked(cf.meta)
	if err != nil {
		return r, err
	}
	if held {
		err := control.Dial(cf.controlPath()).Call(e.ctx, control.Request{Op: control.OpCheck}, &r)
		if errors.Is(err, control.ErrNoServer) {
			return r, inUse(e.ctx, "clone", cf.meta, cf.controlPath(), "", nil)
		}
		return r, err
	}
	if cf.source == "" || cf.dest == "" {
		return r, usagef("no hydrate is running on %s: give --source and --dest to check the clone's files", cf.meta)
	}
	s, err := openClone(e.ctx, cf, cloneOptions(inspect), false, false)
	if err != nil {
		return r, err
	}
	r.Problems = s.c.CheckReport().Problems
	if err := s.close(); err != nil {
		return r, err
	}
	r.OK = len(r.Problems) == 0
	return r, nil
}

// checkCOW checks a persistent dm-snapshot COW device without writing to
// it (exception.CheckCOW: every bad entry, not just the first). A snapshot
// the kernel invalidated and a torn metadata write awaiting repair are
// problems too: the device is not usable as it is.
func checkCOW(path string) (control.CheckReport, error) {
	r := control.CheckReport{Target: path, Engine: "exception"}
	dev, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true, BlockSize: 512})
	if err != nil {
		return r, err
	}
	defer dev.Close()
	rep, err := exception.CheckCOW(dev, 0)
	if err != nil {
		return r, err
	}
	r.Problems = rep.Problems
	if len(r.Problems) == 0 && !rep.Valid {
		r.Problems = append(r.Problems, "the snapshot is marked invalid (it overflowed or failed); its data is not usable")
	}
	if rep.PendingRepair {
		r.Problems = append(r.Problems, fmt.Sprintf("a torn write of metadata area %d awaits repair (opening the snapshot read-write repairs it)", rep.RepairArea))
	}
	r.OK = len(r.Problems) == 0
	return r, nil
}
