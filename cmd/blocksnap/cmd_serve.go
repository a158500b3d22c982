package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/nbd"
	"github.com/blocksnap/blocksnap/snapshot"
)

var cmdServe = &command{
	name: "serve",
	examples: []string{
		"blocksnap serve --origin disk.img --store store.img --listen 127.0.0.1:10809",
		"blocksnap serve --store pool.img --socket /run/blocksnap/pool.sock --listen ''",
		"qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/vm1,format=raw,if=virtio ...",
	},
	summary: "export every volume over NBD under its name (snapshots read-only; the origin, if the store has one, " +
		"as \"origin\" and the default export); the other store commands act on the live server through its control socket",
	long: "SIGINT or SIGTERM drains: requests in flight are answered, every export is flushed, the store is closed. " +
		"With TLS, SIGHUP reloads the certificates from --tls-creds for new connections; open ones keep theirs. " +
		"Without TLS it listens only on loopback (or a Unix socket) unless --allow-plaintext is given. " +
		"Volumes created, imported, cloned, snapshotted or renamed through the control socket are exported at once " +
		"(a resized one with its new size, to each new connection); a deleted " +
		"volume's export is withdrawn; a rollback keeps its clients connected. A write that needs space the full store " +
		"lacks fails with ENOSPC (QEMU's werror=enospc pauses the VM), and a warning on standard error comes first, " +
		"when the free data or metadata space drops below an eighth of its region.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fl)
		listen := fl.String("listen", "127.0.0.1:10809", "TCP `ADDR` to serve NBD on (empty: none)")
		sock := fl.String("socket", "", "also serve NBD on the Unix socket `PATH`")
		nf := addNBDFlags(fl)
		js := fl.Bool("json", false, "print the listening addresses as JSON once ready")
		return func(e *env, _ []string) error {
			if *listen == "" && *sock == "" {
				return usagef("nothing to listen on: give --listen or --socket")
			}
			opts, err := nf.options(nbd.Options{DefaultExport: "origin"}, e.stderr)
			if err != nil {
				return err
			}
			if err := nf.checkListen("--listen", *listen); err != nil {
				return err
			}
			return runServe(e, sf, opts, nf.metrics, *listen, *sock, *js)
		}
	},
}

// serveInfo is printed (as JSON with --json) once the server is ready.
type serveInfo struct {
	Listen  string   `json:"listen,omitempty"`
	Socket  string   `json:"socket,omitempty"`
	Control string   `json:"control"`
	Metrics string   `json:"metrics,omitempty"`
	Exports []string `json:"exports"`
}

func runServe(e *env, sf *storeFlags, opts nbd.Options, metrics, listen, sock string, js bool) error {
	s, err := openSessionWith(sf, readWrite, lowSpaceWarnings(storeOptions(readWrite), sf, e.stderr))
	if errors.Is(err, ErrStoreInUse) {
		return inUse(e.ctx, "store", sf.store, sf.controlPath(), "one serve per store: use that one (or stop it first: kill -TERM PID)", err)
	}
	if err != nil {
		return err
	}
	if !s.st.HasOrigin() && opts.DefaultExport == "origin" {
		// A pool has no origin: the empty export name (nbd://host:port)
		// selects the first volume exported.
		opts.DefaultExport = ""
	}
	vs, err := newVolumeServer(s.st, opts)
	if err == nil {
		vs.ops = ops{st: s.st, originPath: sf.origin, storePath: sf.store, storeSize: s.store.Size(), live: true,
			onCreate: vs.add, onDelete: vs.retire, onRename: vs.rename, connections: vs.connections}
		vs.info = control.Info{Program: "blocksnap serve", PID: os.Getpid(), Started: time.Now(),
			Control: sf.controlPath(), Store: sf.store, Origin: sf.origin}
		err = vs.serve(e, sf.controlPath(), metrics, listen, sock, js)
	}
	if vs != nil {
		vs.closeVolumes()
	}
	if cerr := s.close(); err == nil {
		err = cerr
	}
	return err
}

// lowSpaceWarnings makes serve say on w when the store's free data or
// metadata space drops below the store's low-water mark (an eighth of
// the region), once per crossing, so that an operator extends the store
// device and runs grow before writes fail with ENOSPC. The store calls
// them on its own goroutine with no lock held; w takes whole lines from
// several goroutines (standard error).
func lowSpaceWarnings(opts snapshot.Options, sf *storeFlags, w io.Writer) snapshot.Options {
	opts.LowData = func(free, total int64) {
		fmt.Fprintf(w, "blocksnap serve: warning: store %s is low on data space: %s free of %s; "+
			"when it is full, writes that need space fail with ENOSPC (extend the store device, then blocksnap grow)\n",
			sf.store, human(free), human(total))
	}
	opts.LowMetadata = func(free, total int64) {
		fmt.Fprintf(w, "blocksnap serve: warning: store %s is low on metadata space: %s free of %s; "+
			"when it is full, changes fail with ENOSPC and only deletes work\n",
			sf.store, human(free), human(total))
	}
	return opts
}

// volumeServer exports a store's volumes over NBD and keeps the exports in
// step with snapshots, clones and deletes made through the control socket.
type volumeServer struct {
	st   *snapshot.Store
	nbd  *nbd.Server
	opts nbd.Options  // nbd's options
	ops  ops          // set before serving; its hooks call back into vs
	info control.Info // set before serving, then read-only

	mu      sync.Mutex // guards exports. Lock order: vs.mu, then the nbd server's and the store's locks (closing a handle); never the reverse
	exports map[string]*liveDev
}

func newVolumeServer(st *snapshot.Store, opts nbd.Options) (*volumeServer, error) {
	srv, err := nbd.New(opts)
	if err != nil {
		return nil, err
	}
	vs := &volumeServer{st: st, nbd: srv, opts: opts, exports: map[string]*liveDev{}}
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
	if err := vs.export(name, d, v); err != nil {
		v.Close()
		return err
	}
	vs.exports[name] = d
	return nil
}

// retire withdraws a deleted volume's export: new connections no longer
// see it, and the connections open on it are closed once their requests in
// flight are answered (requests after the delete get an error). A volume
// created again under the name gets a fresh export.
func (vs *volumeServer) retire(name string) {
	vs.mu.Lock()
	d, ok := vs.exports[name]
	if !ok {
		vs.mu.Unlock()
		return
	}
	delete(vs.exports, name)
	_ = vs.nbd.Remove(name) // present: added together with vs.exports[name]
	old := d.v.Swap(nil)
	vs.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = vs.nbd.CloseExport(ctx, name) // on timeout the stragglers get errors from d
	if old != nil {
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

// rename moves a renamed volume's export to its new name; connections
// open on the old name keep working on the same volume.
func (vs *volumeServer) rename(oldName, newName string) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	d, ok := vs.exports[oldName]
	if !ok {
		return
	}
	v := d.v.Load()
	if v == nil {
		return
	}
	_ = vs.nbd.Remove(oldName) // present: added together with vs.exports[oldName]
	delete(vs.exports, oldName)
	if err := vs.export(newName, d, v); err == nil {
		vs.exports[newName] = d
	}
}

// export adds v's NBD export under name, read-only for a snapshot (and
// for the origin of a read-only origin device).
func (vs *volumeServer) export(name string, d *liveDev, v *snapshot.Volume) error {
	desc := fmt.Sprintf("blocksnap %s %s", v.Kind(), name)
	return vs.nbd.Add(nbd.Export{Name: name, Description: desc, Device: d, ReadOnly: v.ReadOnly()})
}

// connections counts the NBD connections on the export named name now.
func (vs *volumeServer) connections(name string) int64 {
	for _, x := range vs.nbd.Stats().Exports {
		if x.Name == name {
			return x.Connections
		}
	}
	return 0
}

// handle runs a control request against the live store.
func (vs *volumeServer) handle(ctx context.Context, r control.Request) (any, error) {
	if r.Op == control.OpInfo {
		return vs.info, nil
	}
	return vs.ops.do(ctx, r)
}

// serve listens, reports readiness, and serves until e.ctx ends (SIGINT,
// SIGTERM), then drains: the NBD server answers requests in flight and
// flushes every export; the control socket closes.
func (vs *volumeServer) serve(e *env, controlPath, metrics, listen, sock string, js bool) error {
	var ls []net.Listener
	closeAll := func() {
		for _, l := range ls {
			l.Close()
		}
	}
	info := serveInfo{Control: controlPath}
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
	ms, err := serveMetrics(metrics, vs.nbd, e.stderr)
	if err != nil {
		closeAll()
		return err
	}
	defer ms.stop()
	if ms != nil {
		info.Metrics = ms.addr
	}
	// vs.info is read by the control handler: complete before it starts.
	vs.info.Listen, vs.info.Socket, vs.info.Metrics = info.Listen, info.Socket, info.Metrics
	cs, err := control.Listen(controlPath, vs.handle, classify)
	if err != nil {
		closeAll()
		return err
	}
	defer cs.Close()
	info.Exports = vs.names()
	// SIGHUP is handled before readiness is announced: from then on it
	// reloads the certificates rather than ending the process.
	stopReload := reloadOnHangup(vs.nbd, vs.opts, "serve", e.stderr)
	defer stopReload()
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
		if info.Metrics != "" {
			where += ", metrics on http://" + info.Metrics + "/metrics"
		}
		_, err = fmt.Fprintf(e.stdout, "serving %d volumes on%s (control socket %s); ^C to stop\n", len(info.Exports), where, controlPath)
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

// MapAllocation passes the volume's holes and zero mappings on to the
// NBD server's block status.
func (d *liveDev) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	v, err := d.vol()
	if err != nil {
		return 0, blockdev.Allocated, err
	}
	return v.MapAllocation(off, n)
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

// Size is the volume's size now, so that a connection made after a
// resize sees the new size (each NBD connection learns the size once, at
// its handshake). Once the volume is deleted (no new connection can
// reach the export) it is the size the volume was exported with.
func (d *liveDev) Size() int64 {
	if v := d.v.Load(); v != nil {
		return v.Size()
	}
	return d.size
}

func (d *liveDev) BlockSize() int { return d.bs }

// Close does nothing: the server owns the volumes (closeVolumes).
func (d *liveDev) Close() error { return nil }
