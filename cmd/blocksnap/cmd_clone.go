package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/nbd"
)

var cmdHydrate = &command{
	name: "hydrate",
	args: "--source PATH|nbd://... --dest PATH --meta PATH [--serve ADDR] [--region-size 64KiB] [--rate SIZE] [--format] [--json]",
	summary: "hydrate a destination from a read-only source in the background (the dm-clone target), " +
		"optionally serving the clone over NBD meanwhile; resumes where a previous run stopped",
}

var cmdStatus = &command{
	name:    "status",
	args:    "--source PATH|nbd://... --dest PATH --meta PATH [--json]",
	summary: "show a clone's hydration status (asks the running hydrate when it holds the clone)",
}

func init() {
	cmdHydrate.run = runHydrate
	cmdStatus.run = runStatus
}

// errCloneInUse: a running hydrate holds the clone.
var errCloneInUse = errors.New("clone is in use by another process")

// cloneFlags are the flags of hydrate and status.
type cloneFlags struct {
	source, dest, meta, control string
}

func addCloneFlags(fl interface {
	StringVar(*string, string, string, string)
}) *cloneFlags {
	f := &cloneFlags{}
	fl.StringVar(&f.source, "source", "", "source `PATH` or nbd:// URI (read-only)")
	fl.StringVar(&f.dest, "dest", "", "destination `PATH` (created with the source's size if missing)")
	fl.StringVar(&f.meta, "meta", "", "metadata `PATH` (created if missing)")
	fl.StringVar(&f.control, "control", "", "control socket `PATH` of a running hydrate (default META.control)")
	return f
}

func (f *cloneFlags) check() error {
	var missing []string
	for _, x := range []struct{ v, n string }{{f.source, "--source"}, {f.dest, "--dest"}, {f.meta, "--meta"}} {
		if x.v == "" {
			missing = append(missing, x.n)
		}
	}
	if len(missing) > 0 {
		return usagef("missing %s", strings.Join(missing, " and "))
	}
	return nil
}

func (f *cloneFlags) controlPath() string {
	if f.control != "" {
		return f.control
	}
	return f.meta + ".control"
}

// statusJSON is a clone's status as the command prints it.
type statusJSON struct {
	State         string  `json:"state"`
	RegionSize    int64   `json:"region_size"`
	Regions       uint64  `json:"regions"`
	Hydrated      uint64  `json:"hydrated"`
	Percent       float64 `json:"percent"`
	InFlight      int     `json:"in_flight"`
	BytesCopied   int64   `json:"bytes_copied"`
	BytesSkipped  int64   `json:"bytes_skipped"`
	Rate          float64 `json:"rate"`
	ETASeconds    float64 `json:"eta_seconds"`
	Errors        int64   `json:"errors"`
	LastError     string  `json:"last_error,omitempty"`
	MetadataError string  `json:"metadata_error,omitempty"`
}

func statusOf(s clone.Status) statusJSON {
	j := statusJSON{State: s.State.String(), RegionSize: s.RegionSize, Regions: s.Regions, Hydrated: s.Hydrated,
		InFlight: s.InFlight, BytesCopied: s.BytesCopied, BytesSkipped: s.BytesSkipped, Rate: s.Rate,
		ETASeconds: s.ETA.Seconds(), Errors: s.Errors}
	if s.Regions > 0 {
		j.Percent = float64(s.Hydrated) * 100 / float64(s.Regions)
	}
	if s.LastError != nil {
		j.LastError = s.LastError.Error()
	}
	if s.MetadataError != nil {
		j.MetadataError = s.MetadataError.Error()
	}
	return j
}

func (j statusJSON) String() string {
	s := fmt.Sprintf("%s: %d of %d regions hydrated (%.1f%%), %s copied, %s skipped",
		j.State, j.Hydrated, j.Regions, j.Percent, human(j.BytesCopied), human(j.BytesSkipped))
	if j.Rate > 0 && j.State == clone.Hydrating.String() {
		s += fmt.Sprintf(", %s/s, ETA %s", human(int64(j.Rate)), time.Duration(j.ETASeconds*float64(time.Second)).Round(time.Second))
	}
	if j.Errors > 0 {
		s += fmt.Sprintf(", %d copy errors (last: %s)", j.Errors, j.LastError)
	}
	return s
}

// openSource opens a source path read-only, or dials an NBD URI.
func openSource(ctx context.Context, src string) (blockdev.Device, error) {
	if isArchive(src) {
		return openArchiveSource(ctx, src)
	}
	if strings.HasPrefix(src, "nbd://") || strings.HasPrefix(src, "nbd+unix://") || strings.HasPrefix(src, "nbd+tcp://") {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return nbd.Dial(dctx, src)
	}
	d, err := blockdev.Open(src, blockdev.FileOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	return d, nil
}

// cloneSession is an open clone with its devices and locks.
type cloneSession struct {
	c               *clone.Clone
	src, dest, meta blockdev.Device
	locks           []*os.File
}

func (s *cloneSession) close() error {
	var err error
	if s.c != nil {
		err = s.c.Close()
	}
	for _, d := range []blockdev.Device{s.dest, s.meta} {
		if d == nil {
			continue
		}
		if ferr := d.Flush(); err == nil {
			err = ferr
		}
		d.Close()
	}
	if s.src != nil {
		s.src.Close()
	}
	unlock(s.locks)
	return err
}

// openClone opens (create: or creates, when meta is new) the clone the
// flags name.
func openClone(ctx context.Context, f *cloneFlags, opts clone.Options, create, format bool) (*cloneSession, error) {
	s := &cloneSession{}
	fail := func(err error) (*cloneSession, error) {
		s.close()
		return nil, err
	}
	var err error
	if s.src, err = openSource(ctx, f.source); err != nil {
		return fail(err)
	}
	fresh := format
	if fi, err := os.Stat(f.meta); errors.Is(err, fs.ErrNotExist) || (err == nil && fi.Mode().IsRegular() && fi.Size() == 0) {
		if !create {
			return fail(fmt.Errorf("meta %s holds no clone (start one with blocksnap hydrate)", f.meta))
		}
		fresh = true
	}
	size := s.src.Size()
	for _, p := range []struct {
		path string
		size int64
	}{{f.dest, size}, {f.meta, clone.MetadataSize(size, opts.RegionSize)}} {
		fi, err := os.Stat(p.path)
		if create && (errors.Is(err, fs.ErrNotExist) || (err == nil && fi.Mode().IsRegular() && fi.Size() == 0)) {
			d, err := blockdev.Create(p.path, p.size, blockdev.FileOptions{})
			if err != nil {
				return fail(err)
			}
			d.Close()
		}
		l, err := lockFile(p.path)
		if errors.Is(err, errInUse) {
			return fail(fmt.Errorf("%s: %w", p.path, errCloneInUse))
		}
		if err != nil {
			return fail(err)
		}
		s.locks = append(s.locks, l)
	}
	if s.dest, err = blockdev.Open(f.dest, blockdev.FileOptions{}); err != nil {
		return fail(fmt.Errorf("dest: %w", err))
	}
	if s.meta, err = blockdev.Open(f.meta, blockdev.FileOptions{}); err != nil {
		return fail(fmt.Errorf("meta: %w", err))
	}
	if fresh {
		s.c, err = clone.Create(s.src, s.dest, s.meta, opts)
	} else {
		s.c, err = clone.Open(s.src, s.dest, s.meta, opts)
		if errors.Is(err, clone.ErrCorrupt) {
			err = fmt.Errorf("%s holds no valid clone metadata (use --format to start a new clone): %w", f.meta, err)
		}
	}
	if err != nil {
		return fail(err)
	}
	return s, nil
}

func runHydrate(e *env, args []string) error {
	fl := newFlags(e, cmdHydrate)
	cf := addCloneFlags(fl)
	serve := fl.String("serve", "", "serve the clone over NBD on TCP `ADDR` (export \"clone\") while it hydrates, until interrupted")
	var region, rate sizeFlag
	fl.Var(&region, "region-size", "hydration unit `SIZE` for a new clone (default 64KiB)")
	fl.Var(&rate, "rate", "cap background hydration at `SIZE` bytes per second")
	format := fl.Bool("format", false, "start a new clone even if META holds one")
	js := fl.Bool("json", false, "print the final status (and, with --serve, the address) as JSON")
	if _, err := parse(e, cmdHydrate, fl, args, 0, 0); err != nil {
		return err
	}
	if err := cf.check(); err != nil {
		return err
	}
	p := newProgress(e, "hydrate")
	opts := clone.Options{RegionSize: region.n, RateLimit: rate.n, Progress: func(s clone.Status) {
		p.update(int64(s.Hydrated)*s.RegionSize, int64(s.Regions)*s.RegionSize)
	}}
	s, err := openClone(e.ctx, cf, opts, true, *format)
	if err != nil {
		return err
	}
	err = hydrate(e, s, cf.controlPath(), *serve, *js, p)
	p.done()
	if cerr := s.close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	st := statusOf(s.c.Status())
	if *js {
		return writeJSON(e.stdout, st)
	}
	_, err = fmt.Fprintln(e.stdout, st)
	return err
}

func hydrate(e *env, s *cloneSession, control, serve string, js bool, p *progress) error {
	cs, err := listenControl(control, func(_ context.Context, r request) (any, error) {
		switch r.Op {
		case "status":
			return statusOf(s.c.Status()), nil
		case "pause":
			s.c.Pause()
			return statusOf(s.c.Status()), nil
		case "resume":
			s.c.Resume()
			return statusOf(s.c.Status()), nil
		}
		return nil, fmt.Errorf("unknown operation %q (hydrate answers status, pause, resume)", r.Op)
	})
	if err != nil {
		return err
	}
	defer cs.close()
	if serve == "" {
		if err := s.c.Wait(e.ctx); err != nil {
			if e.ctx.Err() != nil {
				return fmt.Errorf("interrupted; hydration resumes where it stopped on the next run (%s)", statusOf(s.c.Status()))
			}
			return err
		}
		return nil
	}
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "clone", Description: "blocksnap hydrating clone", Device: s.c})
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", serve)
	if err != nil {
		return err
	}
	if js {
		err = writeJSON(e.stdout, serveInfo{Listen: l.Addr().String(), Control: control, Exports: []string{"clone"}})
	} else {
		_, err = fmt.Fprintf(e.stdout, "serving the clone on nbd://%s/clone while it hydrates (control socket %s); ^C to stop\n", l.Addr(), control)
	}
	if err != nil {
		l.Close()
		return err
	}
	go func() {
		select {
		case <-s.c.Done():
			p.done()
			fmt.Fprintln(e.stderr, "blocksnap hydrate: hydrated; the destination alone now holds the volume")
		case <-e.ctx.Done():
		}
	}()
	if err := srv.Serve(e.ctx, l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		return err
	}
	return nil
}

func runStatus(e *env, args []string) error {
	fl := newFlags(e, cmdStatus)
	cf := addCloneFlags(fl)
	js := fl.Bool("json", false, "print as JSON")
	if _, err := parse(e, cmdStatus, fl, args, 0, 0); err != nil {
		return err
	}
	if err := cf.check(); err != nil {
		return err
	}
	var st statusJSON
	s, err := openClone(e.ctx, cf, clone.Options{NoHydration: true}, false, false)
	switch {
	case errors.Is(err, errCloneInUse):
		if cerr := callControl(e.ctx, cf.controlPath(), request{Op: "status"}, &st); cerr != nil {
			return fmt.Errorf("%v (and %v)", err, cerr)
		}
	case err != nil:
		return err
	default:
		st = statusOf(s.c.Status())
		if err := s.close(); err != nil {
			return err
		}
		if st.State == clone.Paused.String() && st.Hydrated < st.Regions {
			st.State = "stopped"
		}
	}
	if *js {
		return writeJSON(e.stdout, st)
	}
	_, err = fmt.Fprintln(e.stdout, st)
	return err
}
