package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

var cmdExportDiff = &command{
	name: "export-diff", args: "TO", lo: 1, hi: 1,
	examples: []string{
		"blocksnap export-diff monday -o monday.bsd --origin disk.img --store store.img",
		"blocksnap export-diff tuesday --from monday --compress --origin disk.img --store store.img | ssh backup blocksnap apply-diff --target /srv/vm1.img",
		"blocksnap export-diff vm1-backup --from golden -o vm1.bsd --origin disk.img --store store.img",
	},
	long: "--from may be any snapshot related to TO, as for diff: an earlier snapshot of the same volume, or across clones " +
		"(golden to a snapshot of a VM's clone of it), so a VM's backup is an incremental from its golden image. " +
		"The stream names both snapshots by ID and UUID; apply-diff checks the target is at FROM.",
	summary: "write a diff stream of snapshot TO: incremental from --from, else a full sparse image (standard output by default)",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fl)
		from := fl.String("from", "", "`SNAPSHOT` the receiver already has: any snapshot related to TO (empty: a full export)")
		out := fl.StringP("output", "o", "", "write the stream to `FILE` (default: standard output)")
		compress := fl.Bool("compress", false, "zstd-compress the stream (stream version 2: older blocksnap releases refuse it)")
		js := fl.Bool("json", false, "print the summary as JSON (with --output)")
		return func(e *env, pos []string) error {
			r := control.Request{Op: control.OpExportDiff, From: *from, To: pos[0], Compress: *compress}
			return exportDiff(e, sf, r, *out, *js)
		}
	},
}

var cmdApplyDiff = &command{
	name: "apply-diff",
	examples: []string{
		"blocksnap apply-diff --target restore.img -i monday.bsd",
		"blocksnap apply-diff --target restore.img < tuesday.bsd",
	},
	summary: "apply a diff stream (standard input by default) onto a file or device; idempotent and resumable",
	long: "An incremental stream applies only onto a target at its FROM snapshot (the state file says so) unless --force. " +
		"A target file that holds a qcow2, VMDK, VHD, VHDX or VDI image is refused.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		target := fl.String("target", "", "`PATH` of the file or device to apply onto (a missing file is created)")
		required(fl, "target")
		in := fl.StringP("input", "i", "", "read the stream from `FILE` (default: standard input)")
		force := fl.Bool("force", false, "apply even if the target is not at the stream's FROM snapshot")
		statePath := fl.String("state", "", "state file `PATH` recording which snapshot the target holds (default TARGET.bsstate)")
		js := fl.Bool("json", false, "print the summary as JSON")
		return func(e *env, _ []string) error { return applyDiff(e, *target, *in, *statePath, *force, *js) }
	},
}

// streamSummary is what export-diff and apply-diff print.
type streamSummary struct {
	From      string `json:"from,omitempty"`
	To        string `json:"to"`
	Full      bool   `json:"full"`
	Records   int64  `json:"records"`
	DataBytes int64  `json:"data_bytes"`
	ZeroBytes int64  `json:"zero_bytes"`
	// apply-diff only
	Target  string `json:"target,omitempty"`
	Applied int64  `json:"applied,omitempty"`
	Resumed int64  `json:"resumed,omitempty"`
	NoOp    bool   `json:"noop,omitempty"`
	State   string `json:"state,omitempty"`
}

func openSnapshot(st *snapshot.Store, name, role string) (*snapshot.Volume, error) {
	v, err := st.OpenVolume(name)
	if err != nil {
		return nil, err
	}
	if v.Kind() != snapshot.KindSnapshot {
		v.Close()
		return nil, fmt.Errorf("%s %s is a %s, not a snapshot (a live volume changes while it is read; snapshot it first): %w", role, name, v.Kind(), errNotSnapshot)
	}
	return v, nil
}

func exportDiff(e *env, sf *storeFlags, r control.Request, out string, js bool) error {
	from, to := r.From, r.To
	if out == "" {
		if f, ok := e.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			return usagef("refusing to write a binary stream to a terminal: give --output FILE or redirect standard output")
		}
	}
	sum := streamSummary{From: from, To: to, Full: from == ""}
	err := writeStream(e, out, func(w io.Writer) error {
		p := newProgress(e, "export-diff "+to)
		defer p.done()
		s, err := openSession(sf, inspect)
		if errors.Is(err, ErrStoreInUse) {
			// A running serve holds the store: it writes the stream.
			n, cerr := exportRemote(e.ctx, control.Dial(sf.controlPath()), r, w, func(n int64) { p.update(n, 0) })
			if errors.Is(cerr, control.ErrNoServer) {
				return inUse(e.ctx, "store", sf.store, sf.controlPath(), "", err)
			}
			sum.Records, sum.DataBytes, sum.ZeroBytes = n.Records, n.DataBytes, n.ZeroBytes
			return cerr
		}
		if err != nil {
			return err
		}
		tot, err := exportStream(e.ctx, s.st, r, w, func(done, total int64) { p.update(done, total) })
		if cerr := s.close(); err == nil {
			err = cerr
		}
		sum.Records, sum.DataBytes, sum.ZeroBytes = tot.Records, tot.DataBytes, tot.ZeroBytes
		return err
	})
	if err != nil || out == "" {
		return err
	}
	if js {
		return writeJSON(e.stdout, sum)
	}
	what := "full export of " + sum.To
	if !sum.Full {
		what = fmt.Sprintf("incremental export %s -> %s", sum.From, sum.To)
	}
	_, err = fmt.Fprintf(e.stdout, "%s written to %s: %d records, %s data, %s zeros\n", what, out, sum.Records, human(sum.DataBytes), human(sum.ZeroBytes))
	return err
}

// exportRemote has a running serve write the stream and copies it to w,
// verifying it on the way: a stream the server could not finish is an
// error here. progress gets the bytes received so far.
func exportRemote(ctx context.Context, c *control.Client, r control.Request, w io.Writer, progress func(int64)) (diffstream.Totals, error) {
	rc, err := c.CallStream(ctx, r)
	if err != nil {
		return diffstream.Totals{}, err
	}
	defer rc.Close()
	cw := &countingWriter{w: w, progress: progress}
	sr, err := diffstream.NewReader(io.TeeReader(rc, cw))
	if err != nil {
		return diffstream.Totals{}, fmt.Errorf("stream from the server: %w", err)
	}
	for {
		_, err := sr.Next()
		if errors.Is(err, io.EOF) {
			return sr.Totals(), cw.err
		}
		if err != nil {
			return sr.Totals(), fmt.Errorf("stream from the server: %w", err)
		}
		if cw.err != nil {
			return sr.Totals(), cw.err
		}
	}
}

type countingWriter struct {
	w        io.Writer
	n        int64
	err      error
	progress func(int64)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	if c.progress != nil {
		c.progress(c.n)
	}
	return n, err
}

// exportStream writes the diff stream r asks for: from snapshot r.From
// (empty: a full export) to snapshot r.To, through
// snapshot.Store.ExportDiff.
func exportStream(ctx context.Context, st *snapshot.Store, r control.Request, w io.Writer, progress func(done, total int64)) (diffstream.Totals, error) {
	tv, err := openSnapshot(st, r.To, "TO")
	if err != nil {
		return diffstream.Totals{}, err
	}
	defer tv.Close()
	var fv *snapshot.Volume
	if r.From != "" {
		if fv, err = openSnapshot(st, r.From, "--from"); err != nil {
			return diffstream.Totals{}, err
		}
		defer fv.Close()
	}
	return st.ExportDiff(ctx, w, fv, tv, snapshot.ExportOptions{Compress: r.Compress, Progress: progress})
}

// writeStream runs fn on standard output, or on FILE written beside it and
// renamed into place only when complete.
func writeStream(e *env, path string, fn func(io.Writer) error) error {
	if path == "" {
		bw := bufio.NewWriterSize(e.stdout, 1<<20)
		if err := fn(bw); err != nil {
			return err
		}
		return bw.Flush()
	}
	tmp := path + ".partial"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	err = fn(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

func applyDiff(e *env, target, in, statePath string, force, js bool) error {
	if statePath == "" {
		statePath = diffstream.DefaultStatePath(target)
	}
	var r io.Reader = e.stdin
	if in != "" {
		f, err := os.Open(in)
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	}
	sr, err := diffstream.NewReader(bufio.NewReaderSize(r, 1<<20))
	if err != nil {
		return fmt.Errorf("reading the stream: %w", err)
	}
	h := sr.Header()
	dev, release, err := openTarget(target, h)
	if err != nil {
		return err
	}
	defer release()
	p := newProgress(e, "apply-diff "+h.To.Name)
	res, err := diffstream.ApplyReader(e.ctx, sr, dev, diffstream.ApplyOptions{
		Force: force, StatePath: statePath,
		Progress: func(pr diffstream.Progress) { p.update(pr.Done, pr.Total) },
	})
	p.done()
	if cerr := dev.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	st, _ := diffstream.ReadState(statePath)
	sum := streamSummary{From: h.From.Name, To: h.To.Name, Full: h.Full(), Records: res.Totals.Records,
		DataBytes: res.Totals.DataBytes, ZeroBytes: res.Totals.ZeroBytes, Target: target,
		Applied: res.Applied, Resumed: res.Resumed, NoOp: res.NoOp, State: st.String()}
	if js {
		return writeJSON(e.stdout, sum)
	}
	if res.NoOp {
		_, err = fmt.Fprintf(e.stdout, "%s is already at %s; nothing to do\n", target, h.To)
		return err
	}
	resumed := ""
	if res.Resumed > 0 {
		resumed = fmt.Sprintf(" (resumed after %d records)", res.Resumed)
	}
	_, err = fmt.Fprintf(e.stdout, "applied %d records%s onto %s: %s data, %s zeros; target is %s\n",
		res.Applied, resumed, target, human(res.Totals.DataBytes), human(res.Totals.ZeroBytes), st)
	return err
}

// openTarget opens (or creates) the apply target and locks it against a
// second apply. The returned function releases the lock.
func openTarget(path string, h diffstream.Header) (*blockdev.File, func(), error) {
	opts := blockdev.FileOptions{BlockSize: 512}
	if h.BlockSize%4096 == 0 {
		opts.BlockSize = 4096
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		d, err := blockdev.Create(path, h.VolumeSize, opts)
		if err != nil {
			return nil, nil, err
		}
		d.Close()
	case err != nil:
		return nil, nil, err
	case !fi.Mode().IsRegular():
		opts.BlockSize = 0 // a device node: its own sector size
	default:
		// A raw stream written into a disk image would wreck it.
		if err := refuseImage("target", path); err != nil {
			return nil, nil, err
		}
	}
	d, err := blockdev.Open(path, opts)
	if err != nil {
		return nil, nil, err
	}
	if err := d.Lock(blockdev.LockExclusive); err != nil {
		d.Close()
		if errors.Is(err, blockdev.ErrLocked) {
			return nil, nil, fmt.Errorf("target %s is in use by another process", path)
		}
		return nil, nil, err
	}
	return d, func() { _ = d.Unlock() }, nil
}
