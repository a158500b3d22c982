package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/nbd"
	"github.com/blocksnap/blocksnap/snapshot"
)

var cmdServe = &command{
	name: "serve",
	args: "--origin PATH --store PATH [--listen 127.0.0.1:10809] [--socket PATH] [--control PATH] [--json]",
	summary: "export the origin as \"origin\" and every snapshot (read-only) and clone over NBD; " +
		"snapshot, clone, delete, list, stat, diff and export-diff act on the live server through its control socket",
}

func init() {
	cmdServe.run = runServe
}

// serveInfo is printed (as JSON with --json) once the server is ready.
type serveInfo struct {
	Listen  string   `json:"listen,omitempty"`
	Socket  string   `json:"socket,omitempty"`
	Control string   `json:"control"`
	Exports []string `json:"exports"`
}

func runServe(e *env, args []string) error {
	fl := newFlags(e, cmdServe)
	sf := addStoreFlags(fl)
	listen := fl.String("listen", "127.0.0.1:10809", "TCP `ADDR` to serve NBD on (empty: none)")
	sock := fl.String("socket", "", "also serve NBD on the Unix socket `PATH`")
	js := fl.Bool("json", false, "print the listening addresses as JSON once ready")
	if _, err := parseStore(e, cmdServe, fl, sf, args, 0, 0); err != nil {
		return err
	}
	if *listen == "" && *sock == "" {
		return usagef("nothing to listen on: give --listen or --socket")
	}
	s, err := openSession(sf)
	if err != nil {
		return err
	}
	vs, err := newVolumeServer(s.st)
	if err == nil {
		err = vs.serve(e, sf.controlPath(), *listen, *sock, *js)
	}
	if vs != nil {
		vs.closeVolumes()
	}
	if cerr := s.close(); err == nil {
		err = cerr
	}
	return err
}

// volumeServer exports a store's volumes over NBD and keeps the exports in
// step with snapshots, clones and deletes made through the control socket.
type volumeServer struct {
	st  *snapshot.Store
	nbd *nbd.Server

	mu      sync.Mutex // guards exports and serializes control operations
	exports map[string]*liveDev
}

func newVolumeServer(st *snapshot.Store) (*volumeServer, error) {
	srv, err := nbd.New(nbd.Options{DefaultExport: "origin"})
	if err != nil {
		return nil, err
	}
	vs := &volumeServer{st: st, nbd: srv, exports: map[string]*liveDev{}}
	for _, i := range st.List() {
		v, err := st.OpenID(i.ID)
		if err != nil {
			return vs, err
		}
		if err := vs.add(v); err != nil {
			return vs, err
		}
	}
	return vs, nil
}

// add exports v, taking ownership of the handle.
func (vs *volumeServer) add(v *snapshot.Volume) error {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	name := v.Info().Name
	d := &liveDev{size: v.Size(), bs: v.BlockSize()}
	d.v.Store(v)
	ro := v.Kind() == snapshot.KindSnapshot
	desc := fmt.Sprintf("blocksnap %s %s", v.Kind(), name)
	if err := vs.nbd.Add(nbd.Export{Name: name, Description: desc, Device: d, ReadOnly: ro}); err != nil {
		v.Close()
		return err
	}
	vs.exports[name] = d
	return nil
}

// retire withdraws a deleted volume's export: new connections no longer
// see it, and connections still open on it get an error for every request.
// A volume created again under the name gets a fresh export.
func (vs *volumeServer) retire(name string) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	d, ok := vs.exports[name]
	if !ok {
		return
	}
	delete(vs.exports, name)
	_ = vs.nbd.Remove(name) // present: added together with vs.exports[name]
	if old := d.v.Swap(nil); old != nil {
		old.Close()
	}
}

func (vs *volumeServer) names() []string {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	var out []string
	for n, d := range vs.exports {
		if d.v.Load() != nil {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

func (vs *volumeServer) closeVolumes() {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	for _, d := range vs.exports {
		if v := d.v.Swap(nil); v != nil {
			v.Close()
		}
	}
}

// handle runs a control request against the live store.
func (vs *volumeServer) handle(ctx context.Context, r request) (any, error) {
	o := &ops{st: vs.st, onCreate: vs.add, onDelete: vs.retire}
	return o.do(ctx, r)
}

// serve listens, reports readiness, and serves until e.ctx ends (SIGINT,
// SIGTERM), then drains: the NBD server answers requests in flight and
// flushes every export; the control socket closes.
func (vs *volumeServer) serve(e *env, control, listen, sock string, js bool) error {
	cs, err := listenControl(control, vs.handle)
	if err != nil {
		return err
	}
	defer cs.close()
	var ls []net.Listener
	closeAll := func() {
		for _, l := range ls {
			l.Close()
		}
	}
	info := serveInfo{Control: control}
	if listen != "" {
		l, err := net.Listen("tcp", listen)
		if err != nil {
			return err
		}
		ls = append(ls, l)
		info.Listen = l.Addr().String()
	}
	if sock != "" {
		os.Remove(sock)
		l, err := net.Listen("unix", sock)
		if err != nil {
			closeAll()
			return err
		}
		ls = append(ls, l)
		info.Socket = sock
	}
	info.Exports = vs.names()
	if js {
		err = writeJSON(e.stdout, info)
	} else {
		where := ""
		if info.Listen != "" {
			where = " nbd://" + info.Listen
		}
		if info.Socket != "" {
			where += " nbd+unix:///?socket=" + info.Socket
		}
		_, err = fmt.Fprintf(e.stdout, "serving %d volumes on%s (control socket %s); ^C to stop\n", len(info.Exports), where, control)
	}
	if err != nil {
		closeAll()
		return err
	}
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	errs := make(chan error, len(ls))
	for _, l := range ls {
		go func() {
			err := vs.nbd.Serve(ctx, l)
			if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				cancel() // one listener failing stops the server
			}
			errs <- err
		}()
	}
	var first error
	for range ls {
		if err := <-errs; err != nil && !errors.Is(err, nbd.ErrServerClosed) && first == nil {
			first = err
		}
	}
	// Serve has shut the NBD server down gracefully (drain and flush).
	return first
}

// liveDev is an export's device: the volume currently under its name, or
// none after a delete (every call fails).
type liveDev struct {
	v    atomic.Pointer[snapshot.Volume]
	size int64
	bs   int
}

var errDeleted = fmt.Errorf("volume was deleted: %w", snapshot.ErrInvalidSnapshot)

func (d *liveDev) vol() (*snapshot.Volume, error) {
	if v := d.v.Load(); v != nil {
		return v, nil
	}
	return nil, errDeleted
}

func (d *liveDev) ReadAt(p []byte, off int64) (int, error) {
	v, err := d.vol()
	if err != nil {
		return 0, err
	}
	return v.ReadAt(p, off)
}

func (d *liveDev) WriteAt(p []byte, off int64) (int, error) {
	v, err := d.vol()
	if err != nil {
		return 0, err
	}
	return v.WriteAt(p, off)
}

func (d *liveDev) WriteAtFUA(p []byte, off int64) (int, error) {
	v, err := d.vol()
	if err != nil {
		return 0, err
	}
	return blockdev.WriteFUA(v, p, off)
}

func (d *liveDev) WriteZeroes(off, n int64) error {
	v, err := d.vol()
	if err != nil {
		return err
	}
	return blockdev.WriteZeroes(v, off, n)
}

func (d *liveDev) Flush() error {
	if v := d.v.Load(); v != nil {
		return v.Flush()
	}
	return nil
}

func (d *liveDev) Discard(off, n int64) error {
	v, err := d.vol()
	if err != nil {
		return err
	}
	return v.Discard(off, n)
}

func (d *liveDev) Size() int64    { return d.size }
func (d *liveDev) BlockSize() int { return d.bs }

// Close does nothing: the server owns the volumes (closeVolumes).
func (d *liveDev) Close() error { return nil }
