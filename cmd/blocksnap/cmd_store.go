package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

var cmdFormat = &command{
	name:    "format",
	args:    "--origin PATH --store PATH [--chunk-size 64KiB] [--size SIZE] [--store-size SIZE] [--force]",
	summary: "create an empty store for an origin; --size creates missing files (the origin's contents are kept)",
}

var cmdSnapshot = &command{
	name:    "snapshot",
	args:    "NAME --origin PATH --store PATH [--of VOLUME] [--json]",
	summary: "take a read-only snapshot of the origin (or of the clone --of names)",
}

var cmdClone = &command{
	name:    "clone",
	args:    "NAME --from SNAPSHOT --origin PATH --store PATH [--json]",
	summary: "make a writable clone of a snapshot",
}

var cmdList = &command{
	name:    "list",
	args:    "--origin PATH --store PATH [--json]",
	summary: "list the origin, snapshots and clones",
}

var cmdDelete = &command{
	name:    "delete",
	args:    "NAME --origin PATH --store PATH [--no-wait] [--json]",
	summary: "delete a snapshot or clone; waits until its space is reclaimed unless --no-wait",
}

var cmdRollback = &command{
	name:    "rollback",
	args:    "VOLUME --to SNAPSHOT --origin PATH --store PATH",
	summary: "revert the origin or a clone to one of its snapshots (later snapshots stay intact)",
}

var cmdStat = &command{
	name:    "stat",
	args:    "NAME --origin PATH --store PATH [--json]",
	summary: "space accounting of a volume: mapped, exclusive and shared bytes",
}

var cmdCheck = &command{
	name:    "check",
	args:    "--origin PATH --store PATH [--json]",
	summary: "verify the store's metadata; exit 1 with a report when something is wrong",
}

var cmdDump = &command{
	name:    "dump",
	args:    "--origin PATH --store PATH",
	summary: "print the store's metadata (volumes, space, check result) as JSON, for support",
}

var cmdDiff = &command{
	name:    "diff",
	args:    "FROM [TO] --origin PATH --store PATH [--json]",
	summary: "list the extents that differ between two volumes (TO: default the live volume FROM was taken of)",
}

func init() {
	cmdFormat.run = runFormat
	cmdSnapshot.run = func(e *env, args []string) error {
		fs := newFlags(e, cmdSnapshot)
		sf := addStoreFlags(fs)
		of := fs.String("of", "origin", "`VOLUME` to snapshot: the origin or a clone")
		js := fs.Bool("json", false, "print the new volume as JSON")
		pos, err := parseStore(e, cmdSnapshot, fs, sf, args, 1, 1)
		if err != nil {
			return err
		}
		var v volumeJSON
		if err := runOp(e, sf, request{Op: "snapshot", Name: pos[0], Of: *of}, &v); err != nil {
			return err
		}
		return printVolume(e, v, *js, "snapshot")
	}
	cmdClone.run = func(e *env, args []string) error {
		fs := newFlags(e, cmdClone)
		sf := addStoreFlags(fs)
		from := fs.String("from", "", "`SNAPSHOT` to clone")
		js := fs.Bool("json", false, "print the new volume as JSON")
		pos, err := parseStore(e, cmdClone, fs, sf, args, 1, 1)
		if err != nil {
			return err
		}
		if *from == "" {
			return usagef("missing --from SNAPSHOT")
		}
		var v volumeJSON
		if err := runOp(e, sf, request{Op: "clone", Name: pos[0], From: *from}, &v); err != nil {
			return err
		}
		return printVolume(e, v, *js, "clone")
	}
	cmdList.run = runList
	cmdDelete.run = runDelete
	cmdRollback.run = runRollback
	cmdStat.run = runStat
	cmdCheck.run = runCheck
	cmdDump.run = runDump
	cmdDiff.run = runDiff
}

// parseStore parses a store command's arguments and checks the store
// flags.
func parseStore(e *env, c *command, fs *flag.FlagSet, sf *storeFlags, args []string, lo, hi int) ([]string, error) {
	pos, err := parse(e, c, fs, args, lo, hi)
	if err != nil {
		return nil, err
	}
	return pos, sf.check()
}

// runOp runs r on the store: locally when this process can lock it,
// otherwise through the control socket of the server holding it.
func runOp(e *env, sf *storeFlags, r request, out any) error {
	s, err := openSession(sf)
	if errors.Is(err, ErrStoreInUse) {
		cerr := callControl(e.ctx, sf.controlPath(), r, out)
		if errors.Is(cerr, errNoServer) {
			return fmt.Errorf("%w (and %v)", err, cerr)
		}
		return cerr
	}
	if err != nil {
		return err
	}
	res, err := (&ops{st: s.st}).do(e.ctx, r)
	if cerr := s.close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

func printVolume(e *env, v volumeJSON, js bool, what string) error {
	if js {
		return writeJSON(e.stdout, v)
	}
	of := ""
	if v.Parent != "" {
		of = " of " + v.Parent
	}
	_, err := fmt.Fprintf(e.stdout, "created %s %s%s (id %d)\n", what, v.Name, of, v.ID)
	return err
}

func runFormat(e *env, args []string) error {
	fl := newFlags(e, cmdFormat)
	sf := addStoreFlags(fl)
	var chunk, size, storeSize sizeFlag
	fl.Var(&chunk, "chunk-size", "copy-on-write chunk `SIZE`, a power of two from 4KiB to 1MiB (default 64KiB)")
	fl.Var(&size, "size", "create missing files of `SIZE` (the store too, unless --store-size)")
	fl.Var(&storeSize, "store-size", "`SIZE` of a missing store file (default: --size)")
	force := fl.Bool("force", false, "format even if the store already holds a blocksnap store")
	if _, err := parseStore(e, cmdFormat, fl, sf, args, 0, 0); err != nil {
		return err
	}
	if !storeSize.set {
		storeSize = size
	}
	for _, p := range []struct {
		path string
		size sizeFlag
	}{{sf.origin, size}, {sf.store, storeSize}} {
		if _, err := os.Stat(p.path); errors.Is(err, fs.ErrNotExist) {
			if !p.size.set {
				return fmt.Errorf("%s does not exist (give --size to create it)", p.path)
			}
			d, err := blockdev.Create(p.path, p.size.n, blockdev.FileOptions{})
			if err != nil {
				return err
			}
			d.Close()
		}
	}
	locks, err := lockPaths(sf.origin, sf.store)
	if err != nil {
		return err
	}
	defer unlock(locks)
	o, s, err := openDevices(sf.origin, sf.store)
	if err != nil {
		return err
	}
	defer o.Close()
	defer s.Close()
	if !*force {
		if st, err := snapshot.Open(o, s, snapshot.Options{}); err == nil {
			n := len(st.List())
			st.Close()
			return fmt.Errorf("%s already holds a blocksnap store with %d volumes (use --force to reformat and lose them)", sf.store, n)
		}
	}
	st, err := snapshot.Format(o, s, snapshot.Options{ChunkSize: int(chunk.n)})
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
	_, err = fmt.Fprintf(e.stdout, "formatted store %s (%s) for origin %s (%s), chunk size %s\n",
		sf.store, human(s.Size()), sf.origin, human(o.Size()), human(cs))
	return err
}

func runList(e *env, args []string) error {
	fs := newFlags(e, cmdList)
	sf := addStoreFlags(fs)
	js := fs.Bool("json", false, "print as JSON")
	if _, err := parseStore(e, cmdList, fs, sf, args, 0, 0); err != nil {
		return err
	}
	var vs []volumeJSON
	if err := runOp(e, sf, request{Op: "list"}, &vs); err != nil {
		return err
	}
	if *js {
		return writeJSON(e.stdout, vs)
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tKIND\tPARENT\tSIZE\tCREATED")
	for _, v := range vs {
		parent := v.Parent
		if parent == "" {
			parent = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", v.ID, v.Name, v.Kind, parent, human(v.Size), v.Created.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

func runDelete(e *env, args []string) error {
	fs := newFlags(e, cmdDelete)
	sf := addStoreFlags(fs)
	noWait := fs.Bool("no-wait", false, "return once the delete is durable; reclaim space in the background (next open)")
	js := fs.Bool("json", false, "print the result as JSON")
	pos, err := parseStore(e, cmdDelete, fs, sf, args, 1, 1)
	if err != nil {
		return err
	}
	var out deleteJSON
	s, err := openSession(sf)
	switch {
	case errors.Is(err, ErrStoreInUse):
		if cerr := callControl(e.ctx, sf.controlPath(), request{Op: "delete", Name: pos[0]}, &out); cerr != nil {
			if errors.Is(cerr, errNoServer) {
				return fmt.Errorf("%w (and %v)", err, cerr)
			}
			return cerr
		}
	case err != nil:
		return err
	default:
		err = deleteLocal(e, s, pos[0], !*noWait, &out)
		if cerr := s.close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if *js {
		return writeJSON(e.stdout, out)
	}
	if out.Waited {
		_, err = fmt.Fprintf(e.stdout, "deleted %s; reclaimed %s\n", out.Deleted, human(out.Reclaimed))
	} else {
		_, err = fmt.Fprintf(e.stdout, "deleted %s; space is reclaimed in the background\n", out.Deleted)
	}
	return err
}

func deleteLocal(e *env, s *session, name string, wait bool, out *deleteJSON) error {
	op, err := s.st.Delete(name)
	if err != nil {
		return err
	}
	out.Deleted = name
	if !wait {
		return nil
	}
	p := newProgress(e, "delete "+name)
	defer p.done()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-op.Done():
			if err := op.Wait(e.ctx); err != nil {
				return err
			}
			out.Reclaimed, out.Waited = op.Progress().BytesReclaimed, true
			return nil
		case <-tick.C:
			pr := op.Progress()
			p.text(fmt.Sprintf("%d entries, %s reclaimed", pr.Entries, human(pr.BytesReclaimed)))
		case <-e.ctx.Done():
			return fmt.Errorf("interrupted; the delete is durable and reclaiming resumes at the next open: %w", e.ctx.Err())
		}
	}
}

func runRollback(e *env, args []string) error {
	fs := newFlags(e, cmdRollback)
	sf := addStoreFlags(fs)
	to := fs.String("to", "", "`SNAPSHOT` to roll back to")
	pos, err := parseStore(e, cmdRollback, fs, sf, args, 1, 1)
	if err != nil {
		return err
	}
	if *to == "" {
		return usagef("missing --to SNAPSHOT")
	}
	return withSession(sf, func(s *session) error {
		vol, err := s.st.OpenVolume(pos[0])
		if err != nil {
			return err
		}
		defer vol.Close()
		snap, err := s.st.OpenVolume(*to)
		if err != nil {
			return err
		}
		defer snap.Close()
		p := newProgress(e, "rollback "+pos[0])
		p.text("rewriting the chunks that differ from " + *to)
		err = s.st.Rollback(e.ctx, vol, snap)
		p.done()
		if err != nil {
			return err
		}
		if err := vol.Flush(); err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "rolled %s back to %s\n", pos[0], *to)
		return err
	})
}

func runStat(e *env, args []string) error {
	fs := newFlags(e, cmdStat)
	sf := addStoreFlags(fs)
	js := fs.Bool("json", false, "print as JSON")
	pos, err := parseStore(e, cmdStat, fs, sf, args, 1, 1)
	if err != nil {
		return err
	}
	var st statJSON
	if err := runOp(e, sf, request{Op: "stat", Name: pos[0]}, &st); err != nil {
		return err
	}
	if *js {
		return writeJSON(e.stdout, st)
	}
	_, err = fmt.Fprintf(e.stdout, "%s (%s, id %d): size %s, mapped %s, exclusive %s, shared %s\n",
		st.Name, st.Kind, st.ID, human(st.Size), human(st.Mapped), human(st.Exclusive), human(st.Shared))
	return err
}

// checkReport is check's JSON output.
type checkReport struct {
	OK       bool     `json:"ok"`
	Volumes  int      `json:"volumes"`
	Problems []string `json:"problems,omitempty"`
}

func checkStore(st *snapshot.Store) checkReport {
	r := checkReport{OK: true, Volumes: len(st.List())}
	if err := st.Check(); err != nil {
		r.OK = false
		for _, l := range strings.Split(err.Error(), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				r.Problems = append(r.Problems, l)
			}
		}
	}
	return r
}

func runCheck(e *env, args []string) error {
	fs := newFlags(e, cmdCheck)
	sf := addStoreFlags(fs)
	js := fs.Bool("json", false, "print the report as JSON")
	if _, err := parseStore(e, cmdCheck, fs, sf, args, 0, 0); err != nil {
		return err
	}
	var r checkReport
	if err := withSession(sf, func(s *session) error {
		r = checkStore(s.st)
		return nil
	}); err != nil {
		return err
	}
	if *js {
		if err := writeJSON(e.stdout, r); err != nil {
			return err
		}
	} else if r.OK {
		fmt.Fprintf(e.stdout, "store %s is clean (%d volumes)\n", sf.store, r.Volumes)
	} else {
		fmt.Fprintf(e.stdout, "store %s has problems:\n", sf.store)
		for _, p := range r.Problems {
			fmt.Fprintf(e.stdout, "  %s\n", p)
		}
	}
	if !r.OK {
		return fmt.Errorf("store %s failed its check: %d problems (%s)", sf.store, len(r.Problems), r.Problems[0])
	}
	return nil
}

// dumpJSON is dump's output: everything the store's API tells about it.
type dumpJSON struct {
	Origin     string      `json:"origin"`
	OriginSize int64       `json:"origin_size"`
	Store      string      `json:"store"`
	StoreSize  int64       `json:"store_size"`
	BlockSize  int         `json:"block_size"`
	Volumes    []statJSON  `json:"volumes"`
	Check      checkReport `json:"check"`
}

func runDump(e *env, args []string) error {
	fs := newFlags(e, cmdDump)
	sf := addStoreFlags(fs)
	if _, err := parseStore(e, cmdDump, fs, sf, args, 0, 0); err != nil {
		return err
	}
	return withSession(sf, func(s *session) error {
		d := dumpJSON{Origin: sf.origin, OriginSize: s.origin.Size(), Store: sf.store, StoreSize: s.store.Size(),
			BlockSize: s.st.Origin().BlockSize(), Volumes: []statJSON{}}
		names := nameMap(s.st)
		for _, i := range s.st.List() {
			st, err := s.st.Stat(i.Name)
			if err != nil {
				return err
			}
			d.Volumes = append(d.Volumes, statJSON{volumeJSON: toJSON(i, names), Mapped: st.Mapped, Exclusive: st.Exclusive, Shared: st.Shared})
		}
		d.Check = checkStore(s.st)
		return writeJSON(e.stdout, d)
	})
}

func runDiff(e *env, args []string) error {
	fs := newFlags(e, cmdDiff)
	sf := addStoreFlags(fs)
	js := fs.Bool("json", false, "print as JSON")
	pos, err := parseStore(e, cmdDiff, fs, sf, args, 1, 2)
	if err != nil {
		return err
	}
	r := request{Op: "diff", From: pos[0]}
	if len(pos) == 2 {
		r.To = pos[1]
	}
	var d diffJSON
	if err := runOp(e, sf, r, &d); err != nil {
		return err
	}
	if *js {
		return writeJSON(e.stdout, d)
	}
	for _, x := range d.Extents {
		kind := "data"
		if x.Zero {
			kind = "zero"
		}
		fmt.Fprintf(e.stdout, "%d\t%d\t%s\n", x.Off, x.Len, kind)
	}
	_, err = fmt.Fprintf(e.stdout, "%d extents, %s changed from %s to %s\n", len(d.Extents), human(d.Bytes), d.From, d.To)
	return err
}
