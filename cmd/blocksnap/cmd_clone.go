package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/nbd"
)

// errCloneInUse: a running hydrate holds the clone.
var errCloneInUse = errors.New("clone is in use by another process")

// cloneFlags name a clone's devices.
type cloneFlags struct {
	source, dest, meta, control string
	// connections: how many connections to an nbd:// source (hydrate).
	connections int
}

func addCloneFlags(fs *pflag.FlagSet) *cloneFlags {
	f := &cloneFlags{}
	fs.StringVar(&f.source, "source", "", "source `PATH`, nbd:// URI or s3://BUCKET/PREFIX/BACKUP (read-only)")
	fs.StringVar(&f.dest, "dest", "", "destination `PATH` (created with the source's size if missing)")
	fs.StringVar(&f.meta, "meta", "", "metadata `PATH` (created if missing)")
	addControlFlag(fs, f)
	return f
}

func addControlFlag(fs *pflag.FlagSet, f *cloneFlags) {
	fs.StringVar(&f.control, "control", "", "control socket `PATH` of the running hydrate (default META.control)")
}

func (f *cloneFlags) controlPath() string {
	if f.control != "" {
		return f.control
	}
	return f.meta + ".control"
}

func statusOf(s clone.Status, rateCap int64) control.CloneStatus {
	j := control.CloneStatus{State: s.State.String(), RegionSize: s.RegionSize, Regions: s.Regions, Hydrated: s.Hydrated,
		InFlight: s.InFlight, BytesCopied: s.BytesCopied, BytesSkipped: s.BytesSkipped, Rate: s.Rate,
		RateLimit: rateCap, ETASeconds: s.ETA.Seconds(), Errors: s.Errors}
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

func statusLine(j control.CloneStatus) string {
	s := fmt.Sprintf("%s: %d of %d regions hydrated (%.1f%%), %s copied, %s skipped",
		j.State, j.Hydrated, j.Regions, j.Percent, human(j.BytesCopied), human(j.BytesSkipped))
	if j.Rate > 0 && j.State == clone.Hydrating.String() {
		s += fmt.Sprintf(", %s/s, ETA %s", human(int64(j.Rate)), time.Duration(j.ETASeconds*float64(time.Second)).Round(time.Second))
	}
	if j.RateLimit > 0 {
		s += fmt.Sprintf(", capped at %s/s", human(j.RateLimit))
	}
	if j.Errors > 0 {
		s += fmt.Sprintf(", %d copy errors (last: %s)", j.Errors, j.LastError)
	}
	return s
}

func printStatus(e *env, st control.CloneStatus, js bool) error {
	if js {
		return writeJSON(e.stdout, st)
	}
	_, err := fmt.Fprintln(e.stdout, statusLine(st))
	return err
}

// isNBD reports whether src is an NBD URI rather than a path.
func isNBD(src string) bool {
	for _, p := range []string{"nbd://", "nbd+unix://", "nbd+tcp://", "nbds://", "nbds+unix://"} {
		if strings.HasPrefix(src, p) {
			return true
		}
	}
	return false
}

// openSource opens a source path read-only, or dials an NBD URI with up
// to conns connections (0: one).
func openSource(ctx context.Context, src string, conns int) (blockdev.Device, error) {
	if isArchive(src) {
		return openArchiveSource(ctx, src)
	}
	if isNBD(src) {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		c, err := nbd.DialWith(dctx, src, nbd.DialOptions{Connections: conns})
		if err != nil {
			// Not c: a nil *nbd.Client in a Device is not a nil Device.
			return nil, fmt.Errorf("source %s: %w", src, err)
		}
		return c, nil
	}
	if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("source %s does not exist (give a file, a block device or an nbd:// URI)", src)
	}
	d, err := blockdev.Open(src, blockdev.FileOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	return d, nil
}

// cloneOptions are the options a command opens a clone with: an
// inspecting command (check, status) opens it read-only, so that it never
// changes the clone (no journal epoch, no hydration).
func cloneOptions(a access) clone.Options {
	return clone.Options{ReadOnly: a == inspect}
}

// cloneSession is an open clone with its devices (the clone holds their
// locks).
type cloneSession struct {
	c               *clone.Clone
	src, dest, meta blockdev.Device
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
		if ferr := d.Flush(); err == nil && !errors.Is(ferr, blockdev.ErrReadOnly) {
			err = ferr
		}
		d.Close()
	}
	if s.src != nil {
		s.src.Close()
	}
	return err
}

// emptyOrMissing reports whether path does not exist or is an empty
// regular file.
func emptyOrMissing(path string) bool {
	fi, err := os.Stat(path)
	return errors.Is(err, fs.ErrNotExist) || (err == nil && fi.Mode().IsRegular() && fi.Size() == 0)
}

// openClone opens (create: or creates, when meta is new) the clone the
// flags name. clone.Create and clone.Open lock the destination and the
// metadata; a running hydrate's clone is refused with errCloneInUse. That
// is known before the source is opened (isLocked probes the metadata's
// lock), so that it is reported as such whatever the source.
func openClone(ctx context.Context, f *cloneFlags, opts clone.Options, create, format bool) (*cloneSession, error) {
	s := &cloneSession{}
	var created []string // files this call made, removed again if it fails
	fail := func(err error) (*cloneSession, error) {
		s.close()
		for _, p := range created {
			os.Remove(p)
		}
		return nil, err
	}
	fresh := format || emptyOrMissing(f.meta)
	if fresh && !create {
		return fail(fmt.Errorf("meta %s holds no clone (start one with blocksnap hydrate)", f.meta))
	}
	if !fresh {
		if held, err := isLocked(f.meta); err != nil || held {
			return fail(cmp.Or(err, fmt.Errorf("%s: %w", f.meta, errCloneInUse)))
		}
	}
	var err error
	if s.src, err = openSource(ctx, f.source, f.connections); err != nil {
		return fail(err)
	}
	size := s.src.Size()
	for _, p := range []struct {
		path string
		size int64
	}{{f.dest, size}, {f.meta, clone.MetadataSize(size, opts.RegionSize)}} {
		if create && emptyOrMissing(p.path) {
			_, statErr := os.Stat(p.path)
			d, err := blockdev.Create(p.path, p.size, blockdev.FileOptions{})
			if err != nil {
				return fail(err)
			}
			if errors.Is(statErr, fs.ErrNotExist) {
				created = append(created, p.path)
			}
			d.Close()
		}
	}
	fo := blockdev.FileOptions{ReadOnly: opts.ReadOnly}
	if s.dest, err = blockdev.Open(f.dest, fo); err != nil {
		return fail(fmt.Errorf("dest: %w", err))
	}
	if s.meta, err = blockdev.Open(f.meta, fo); err != nil {
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
	if errors.Is(err, clone.ErrLocked) {
		err = fmt.Errorf("%s: %w", f.meta, errCloneInUse)
	}
	if err != nil {
		return fail(err)
	}
	return s, nil
}

var cmdHydrate = &command{
	name: "hydrate",
	examples: []string{
		"blocksnap hydrate --source nbd://images:10809/golden --dest vm1.img --meta vm1.meta --serve 127.0.0.1:10810 --rate 100MiB",
		"blocksnap set-rate --meta vm1.meta --rate 0",
	},
	summary: "hydrate a destination from a read-only source in the background (the dm-clone target), " +
		"optionally serving the clone over NBD meanwhile; resumes where a previous run stopped",
	long: "While it runs, blocksnap status, pause, resume and set-rate reach it through its control socket. " +
		"With --serve and TLS, SIGHUP reloads the certificates from --tls-creds for new connections.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		cf := addCloneFlags(fl)
		required(fl, "source", "dest", "meta")
		serve := fl.String("serve", "", "serve the clone over NBD on TCP `ADDR` (export \"clone\") while it hydrates, until interrupted")
		var region, rate sizeFlag
		fl.Var(&region, "region-size", "hydration unit `SIZE` for a new clone (default 64KiB)")
		fl.Var(&rate, "rate", "cap background hydration at `SIZE` bytes per second (change it later with set-rate)")
		format := fl.Bool("format", false, "start a new clone even if META holds one")
		fl.IntVar(&cf.connections, "connections", 0, "open up to `N` connections to an nbd:// source that allows several (0: one)")
		nf := addNBDFlags(fl)
		js := fl.Bool("json", false, "print the final status (and, with --serve, the address) as JSON")
		return func(e *env, _ []string) error {
			nopts, err := nf.options(nbd.Options{}, e.stderr)
			if err != nil {
				return err
			}
			if cf.connections < 0 {
				return usagef("--connections %d: want 0 or more", cf.connections)
			}
			if *serve == "" {
				for _, n := range []string{"tls", "tls-creds", "tls-verify-peer", "allow-plaintext", "max-conns", "metrics"} {
					if fl.Changed(n) {
						return usagef("--%s needs --serve", n)
					}
				}
			}
			if err := nf.checkListen("--serve", *serve); err != nil {
				return err
			}
			p := newProgress(e, "hydrate")
			opts := clone.Options{RegionSize: region.n, RateLimit: rate.n, Progress: func(s clone.Status) {
				p.update(int64(s.Hydrated)*s.RegionSize, int64(s.Regions)*s.RegionSize)
			}}
			s, err := openClone(e.ctx, cf, opts, true, *format)
			if errors.Is(err, errCloneInUse) {
				return inUse(e.ctx, "clone", cf.meta, cf.controlPath(), "it is already hydrating this clone (see blocksnap status --meta "+cf.meta+")", nil)
			}
			if err != nil {
				return err
			}
			h := &hydration{s: s, cf: cf, started: time.Now()}
			h.rateCap.Store(rate.n)
			err = h.run(e, *serve, nopts, nf.metrics, *js, p)
			p.done()
			if cerr := s.close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
			return printStatus(e, statusOf(s.c.Status(), h.rateCap.Load()), *js)
		}
	},
}

// hydration is a running hydrate: the clone and what its control socket
// answers.
type hydration struct {
	s       *cloneSession
	cf      *cloneFlags
	started time.Time
	listen  string       // set before the control socket answers, then read-only
	metrics string       // likewise
	rateCap atomic.Int64 // the cap set last (the clone has no getter)
}

func (h *hydration) handle(_ context.Context, r control.Request) (any, error) {
	c := h.s.c
	switch r.Op {
	case control.OpInfo:
		return control.Info{Program: "blocksnap hydrate", PID: os.Getpid(), Started: h.started, Control: h.cf.controlPath(),
			Dest: h.cf.dest, Meta: h.cf.meta, Listen: h.listen, Metrics: h.metrics}, nil
	case control.OpStatus:
	case control.OpPause:
		c.Pause()
	case control.OpResume:
		c.Resume()
	case control.OpSetRate:
		c.SetRateLimit(r.Rate)
		h.rateCap.Store(r.Rate)
	case control.OpCheck:
		rep := c.CheckReport()
		return control.CheckReport{OK: rep.OK(), Target: h.cf.meta, Engine: "clone", Problems: rep.Problems, Live: true}, nil
	default:
		return nil, fmt.Errorf("operation %q is not one a hydrate answers (status, pause, resume, set-rate, check)", r.Op)
	}
	return statusOf(c.Status(), h.rateCap.Load()), nil
}

func (h *hydration) run(e *env, serve string, nopts nbd.Options, metrics string, js bool, p *progress) error {
	var l net.Listener
	var srv *nbd.Server
	if serve != "" {
		var err error
		if srv, err = nbd.New(nopts, nbd.Export{Name: "clone", Description: "blocksnap hydrating clone", Device: h.s.c}); err != nil {
			return err
		}
		if l, err = net.Listen("tcp", serve); err != nil {
			return err
		}
		defer l.Close()
		h.listen = l.Addr().String()
		ms, err := serveMetrics(metrics, srv, e.stderr)
		if err != nil {
			return err
		}
		defer ms.stop()
		if ms != nil {
			h.metrics = ms.addr
		}
	}
	cs, err := control.Listen(h.cf.controlPath(), h.handle, nil)
	if err != nil {
		return err
	}
	defer cs.Close()
	if serve == "" {
		if err := h.s.c.Wait(e.ctx); err != nil {
			if e.ctx.Err() != nil {
				return fmt.Errorf("interrupted; hydration resumes where it stopped on the next run (%s)", statusLine(statusOf(h.s.c.Status(), 0)))
			}
			return err
		}
		return nil
	}
	control := h.cf.controlPath()
	// SIGHUP is handled before readiness is announced: from then on it
	// reloads the certificates rather than ending the process.
	stopReload := reloadOnHangup(srv, nopts, "hydrate", e.stderr)
	defer stopReload()
	if js {
		err = writeJSON(e.stdout, serveInfo{Listen: h.listen, Control: control, Metrics: h.metrics, Exports: []string{"clone"}})
	} else {
		_, err = fmt.Fprintf(e.stdout, "serving the clone on nbd://%s/clone while it hydrates (control socket %s); ^C to stop\n", h.listen, control)
	}
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(e.ctx)
	announced := make(chan struct{})
	go func() {
		defer close(announced)
		select {
		case <-h.s.c.Done():
			p.done()
			fmt.Fprintln(e.stderr, "blocksnap hydrate: hydrated; the destination alone now holds the volume")
		case <-ctx.Done():
		}
	}()
	err = srv.Serve(ctx, l)
	cancel()
	<-announced
	if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		return err
	}
	return nil
}

var cmdStatus = &command{
	name:    "status",
	summary: "show a clone's hydration status",
	long: "With only --meta it asks the hydrate running on that clone, through its control socket. " +
		"When none runs, give --source and --dest too: the status is then read from the clone itself " +
		"(opened read-only: nothing is copied or written).",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		cf := &cloneFlags{}
		fl.StringVar(&cf.meta, "meta", "", "metadata `PATH` of the clone")
		required(fl, "meta")
		fl.StringVar(&cf.source, "source", "", "source `PATH` or nbd:// URI (only when no hydrate is running)")
		fl.StringVar(&cf.dest, "dest", "", "destination `PATH` (only when no hydrate is running)")
		addControlFlag(fl, cf)
		js := fl.Bool("json", false, "print as JSON")
		return func(e *env, _ []string) error {
			st, err := cloneStatus(e, cf)
			if err != nil {
				return err
			}
			return printStatus(e, st, *js)
		}
	},
}

// cloneStatus asks the running hydrate, or reads the clone when none runs.
func cloneStatus(e *env, cf *cloneFlags) (control.CloneStatus, error) {
	if emptyOrMissing(cf.meta) {
		return control.CloneStatus{}, fmt.Errorf("meta %s holds no clone (start one with blocksnap hydrate)", cf.meta)
	}
	held, err := isLocked(cf.meta)
	if err != nil {
		return control.CloneStatus{}, err
	}
	if held {
		st, err := control.Dial(cf.controlPath()).Status(e.ctx)
		if errors.Is(err, control.ErrNoServer) {
			return st, inUse(e.ctx, "clone", cf.meta, cf.controlPath(), "", nil)
		}
		return st, err
	}
	if cf.source == "" || cf.dest == "" {
		return control.CloneStatus{}, usagef("no hydrate is running on %s: give --source and --dest to read its status from the files", cf.meta)
	}
	s, err := openClone(e.ctx, cf, cloneOptions(inspect), false, false)
	if err != nil {
		return control.CloneStatus{}, err
	}
	st := statusOf(s.c.Status(), 0)
	if err := s.close(); err != nil {
		return st, err
	}
	if st.State == clone.Paused.String() && st.Hydrated < st.Regions {
		st.State = "stopped"
	}
	return st, nil
}

// isLocked reports whether another process holds path's lock.
func isLocked(path string) (bool, error) {
	l, err := lockFile(path)
	if errors.Is(err, errInUse) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return false, l.Close()
}

// hydrateControl is a command that sends one request to a running
// hydrate and prints its status.
func hydrateControl(name, summary string, req func(fl *pflag.FlagSet) func() (control.Request, error)) *command {
	return &command{
		name: name, summary: summary,
		define: func(fl *pflag.FlagSet) func(*env, []string) error {
			cf := &cloneFlags{}
			fl.StringVar(&cf.meta, "meta", "", "metadata `PATH` of the clone a hydrate is running on")
			required(fl, "meta")
			addControlFlag(fl, cf)
			js := fl.Bool("json", false, "print the status as JSON")
			mk := req(fl)
			return func(e *env, _ []string) error {
				r, err := mk()
				if err != nil {
					return err
				}
				var st control.CloneStatus
				err = control.Dial(cf.controlPath()).Call(e.ctx, r, &st)
				if errors.Is(err, control.ErrNoServer) {
					return fmt.Errorf("no hydrate is running on %s (%v)", cf.meta, err)
				}
				if err != nil {
					return err
				}
				return printStatus(e, st, *js)
			}
		},
	}
}

var (
	cmdPause = hydrateControl("pause", "pause a running hydrate's background copying (reads and writes through the clone go on)",
		func(*pflag.FlagSet) func() (control.Request, error) {
			return func() (control.Request, error) { return control.Request{Op: control.OpPause}, nil }
		})
	cmdResume = hydrateControl("resume", "resume a paused hydrate's background copying",
		func(*pflag.FlagSet) func() (control.Request, error) {
			return func() (control.Request, error) { return control.Request{Op: control.OpResume}, nil }
		})
	cmdSetRate = hydrateControl("set-rate", "change a running hydrate's cap on background copying (--rate 0: no cap)",
		func(fl *pflag.FlagSet) func() (control.Request, error) {
			var rate sizeFlag
			fl.Var(&rate, "rate", "the new cap in `SIZE` bytes per second (0: no cap)")
			required(fl, "rate")
			return func() (control.Request, error) { return control.Request{Op: control.OpSetRate, Rate: rate.n}, nil }
		})
)
