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
	name:    "check",
	summary: "verify an engine's metadata: a snapshot store, a clone, or a dm-snapshot COW device",
	long: `Give one of:
  --origin PATH --store PATH             a snapshot store (of a running serve: its live state, through its control socket)
  --source PATH --dest PATH --meta PATH  a clone (the dm-clone model)
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
			case sf.origin != "" && sf.store != "" && cf.meta == "":
				err = runOp(e, sf, inspect, control.Request{Op: control.OpCheck}, &r)
			case cf.source != "" && cf.dest != "" && cf.meta != "" && sf.store == "":
				r, err = checkClone(e, cf)
			default:
				return usagef("give --origin and --store, or --source, --dest and --meta, or --cow")
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

// checkClone opens the clone with hydration paused and runs its check.
func checkClone(e *env, cf *cloneFlags) (control.CheckReport, error) {
	r := control.CheckReport{Target: cf.meta, Engine: "clone"}
	s, err := openClone(e.ctx, cf, cloneOptions(inspect), false, false)
	if errors.Is(err, errCloneInUse) {
		return r, inUse(e.ctx, "clone", cf.meta, cf.controlPath(), "check it once that process has stopped")
	}
	if err != nil {
		return r, err
	}
	r.Problems = problems(s.c.Check())
	if err := s.close(); err != nil {
		return r, err
	}
	r.OK = len(r.Problems) == 0
	return r, nil
}

// checkCOW checks a persistent dm-snapshot COW device without writing to
// it: the header and every exception decode (each COW chunk within the
// device, not metadata, used once), the snapshot is valid, and no origin
// chunk has two exceptions. The decoder stops at the first damaged area,
// so a damaged store reports that one problem.
func checkCOW(path string) (control.CheckReport, error) {
	r := control.CheckReport{Target: path, Engine: "exception"}
	dev, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true, BlockSize: 512})
	if err != nil {
		return r, err
	}
	defer dev.Close()
	img, err := exception.LoadPersistent(dev)
	if errors.Is(err, exception.ErrCorrupt) {
		r.Problems = []string{message(err)}
		return r, nil
	}
	if err != nil {
		return r, fmt.Errorf("%s holds no dm-snapshot store: %w", path, err)
	}
	r.Problems = cowProblems(img)
	r.OK = len(r.Problems) == 0
	return r, nil
}

// cowProblems reports what LoadPersistent accepts but a check must not:
// an invalidated snapshot, and two exceptions for one origin chunk (the
// kernel loads them, the later wins). LoadPersistent itself refuses
// exceptions outside the device, on metadata chunks or sharing a chunk.
func cowProblems(img *exception.Image) []string {
	var out []string
	if !img.Valid {
		out = append(out, "the snapshot is marked invalid (it overflowed or failed); its data is not usable")
	}
	oldSeen := map[uint64]int{}
	for i, x := range img.Entries {
		if j, ok := oldSeen[x.Old]; ok {
			out = append(out, fmt.Sprintf("exceptions %d and %d both map origin chunk %d (the later wins)", j, i, x.Old))
		}
		oldSeen[x.Old] = i
	}
	return out
}
