package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
)

// ops runs control requests against an open store: for a command run
// locally, and for `serve` on its control socket. The serve command sets
// the hooks to export new volumes and retire deleted or renamed ones.
type ops struct {
	st *snapshot.Store
	// where the store lives, for dump and check
	originPath, storePath string
	storeSize             int64
	// live: a running serve's state (check reports say so)
	live bool
	// progress, when set, shows a waiting delete and a rollback.
	progress func(what string) *progress

	onCreate func(v *snapshot.Volume) error // takes ownership of v; nil: v is closed
	// connections, when set (serve), counts the NBD connections on a
	// volume's export now: delete refuses a volume in use unless forced.
	connections func(name string) int64
	onDelete    func(name string)
	onRename    func(oldName, newName string)
}

func (o *ops) do(ctx context.Context, r control.Request) (any, error) {
	switch r.Op {
	case control.OpSnapshot:
		of := r.Of
		if of == "" {
			of = "origin"
		}
		return o.create(r.Name, of, o.st.CreateSnapshot)
	case control.OpClone:
		return o.create(r.Name, r.From, o.st.CreateClone)
	case control.OpDelete:
		return o.delete(ctx, r)
	case control.OpProtect, control.OpUnprotect:
		set := o.st.Protect
		if r.Op == control.OpUnprotect {
			set = o.st.Unprotect
		}
		if err := set(r.Name); err != nil {
			return nil, err
		}
		return o.volume(r.Name)
	case control.OpRename:
		if err := o.st.Rename(r.Name, r.NewName); err != nil {
			return nil, err
		}
		if o.onRename != nil {
			o.onRename(r.Name, r.NewName)
		}
		return o.volume(r.NewName)
	case control.OpRollback:
		return o.rollback(ctx, r.Name, r.To)
	case control.OpList:
		return o.list(), nil
	case control.OpStat:
		s, err := o.st.Stat(r.Name)
		if err != nil {
			return nil, err
		}
		return control.VolumeStat{Volume: toJSON(s.VolumeInfo, nameMap(o.st)), Mapped: s.Mapped, Exclusive: s.Exclusive, Shared: s.Shared}, nil
	case control.OpUsage:
		return o.space(), nil
	case control.OpCreate:
		return o.created(o.st.CreateVolume(r.Name, r.Size))
	case control.OpResize:
		if err := o.st.Resize(r.Name, r.Size, snapshot.ResizeOptions{Shrink: r.Shrink}); err != nil {
			return nil, err
		}
		return o.volume(r.Name)
	case control.OpImport:
		return o.importVolume(ctx, r.Name, r.Source)
	case control.OpGrow:
		added, err := o.st.Grow()
		if err != nil {
			return nil, err
		}
		var madded int64
		if r.Metadata > 0 { // after the data region took the device's new space
			if madded, err = o.st.GrowMetadata(ctx, r.Metadata); err != nil {
				return nil, err
			}
		}
		s := o.st.Stats()
		return control.GrowResult{Added: added, DataBytes: s.DataBytes, MetadataAdded: madded, MetadataBytes: s.MetadataRegion}, nil
	case control.OpDiff:
		return o.diff(ctx, r.From, r.To)
	case control.OpCheck:
		return o.check(), nil
	case control.OpDump:
		return o.dump(ctx)
	case control.OpExportDiff:
		if err := checkSnapshot(o.st, r.To, "TO"); err != nil {
			return nil, err
		}
		if r.From != "" {
			if err := checkSnapshot(o.st, r.From, "--from"); err != nil {
				return nil, err
			}
		}
		return control.Stream(func(w io.Writer) error {
			_, err := exportStream(ctx, o.st, r, w, func(int64, int64) {})
			return err
		}), nil
	}
	return nil, fmt.Errorf("operation %q is not one a store answers", r.Op)
}

func toJSON(i snapshot.VolumeInfo, names map[uint64]string) control.Volume {
	return control.Volume{ID: i.ID, UUID: i.UUID.String(), Name: i.Name, Kind: i.Kind.String(), Parent: names[i.Parent],
		ParentID: i.Parent, Created: i.Created, Size: i.Size, Hidden: i.Hidden, Protected: i.Protected}
}

// list is every volume, the hidden snapshots clones hang from included,
// each with its children, so that every parent_id is in the list.
func (o *ops) list() []control.Volume {
	names := nameMap(o.st)
	all := o.st.ListAll()
	out := make([]control.Volume, 0, len(all))
	at := map[uint64]int{}
	for _, i := range all {
		at[i.ID] = len(out)
		out = append(out, toJSON(i, names))
	}
	for _, i := range all {
		if k, ok := at[i.Parent]; ok && i.Parent != 0 {
			out[k].Children = append(out[k].Children, i.ID)
		}
	}
	return out
}

func nameMap(st *snapshot.Store) map[uint64]string {
	m := map[uint64]string{}
	for _, v := range st.List() {
		m[v.ID] = v.Name
	}
	return m
}

func (o *ops) volume(name string) (control.Volume, error) {
	for _, i := range o.st.List() {
		if i.Name == name {
			return toJSON(i, nameMap(o.st)), nil
		}
	}
	return control.Volume{}, fmt.Errorf("%w: %q", snapshot.ErrNotFound, name)
}

func (o *ops) create(name, parent string, make func(string, *snapshot.Volume) (*snapshot.Volume, error)) (any, error) {
	p, err := o.st.OpenVolume(parent)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	return o.created(make(name, p))
}

func (o *ops) delete(ctx context.Context, r control.Request) (any, error) {
	name, wait := r.Name, r.Wait
	var deps []string
	if r.Recursive {
		var err error
		if deps, err = o.st.Dependants(name); err != nil {
			return nil, err
		}
	}
	if o.connections != nil && !r.Force {
		for _, n := range append(deps, name) {
			if k := o.connections(n); k > 0 {
				return nil, fmt.Errorf("%w: %s has %d connected NBD client(s); delete --force closes their connections", errBusy, n, k)
			}
		}
	}
	// A snapshot with clones is refused unless recursive, or detached
	// (it goes as a hidden parent point that list shows).
	op, err := o.st.DeleteWith(name, snapshot.DeleteOptions{Recursive: r.Recursive, Detach: r.Detach})
	if o.onDelete != nil {
		// A recursive delete that failed half way deleted a prefix of
		// deps: retire the exports of those that are gone.
		for _, n := range append(deps, name) {
			v, oerr := o.st.OpenVolume(n)
			if errors.Is(oerr, snapshot.ErrNotFound) {
				o.onDelete(n)
			} else if oerr == nil {
				_ = v.Close()
			}
		}
	}
	if err != nil {
		return nil, err
	}
	out := control.DeleteResult{Deleted: name, Dependants: deps}
	if !wait {
		return out, nil
	}
	var p *progress
	if o.progress != nil {
		p = o.progress("delete " + name)
		defer p.done()
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-op.Done():
			if err := op.Wait(ctx); err != nil {
				return nil, err
			}
			// The dependants' reclaim, and the snapshot's hidden point
			// their clones held, finish in the background too.
			if r.Recursive {
				if err := o.st.WaitIdle(ctx); err != nil {
					return nil, err
				}
			}
			out.Reclaimed, out.Waited = op.Progress().BytesReclaimed, true
			return out, nil
		case <-tick.C:
			if p != nil {
				pr := op.Progress()
				p.text(fmt.Sprintf("%d entries, %s reclaimed", pr.Entries, human(pr.BytesReclaimed)))
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("interrupted; the delete of %s is durable and reclaiming resumes at the next open: %w", name, ctx.Err())
		}
	}
}

// errNotSnapshot: a volume given where a snapshot is needed is not one.
var errNotSnapshot = errors.New("not a snapshot")

func (o *ops) rollback(ctx context.Context, name, to string) (any, error) {
	vol, err := o.st.OpenVolume(name)
	if err != nil {
		return nil, err
	}
	defer vol.Close()
	snap, err := o.st.OpenVolume(to)
	if err != nil {
		return nil, err
	}
	defer snap.Close()
	// Checked here so that the error names the volumes (the store's own
	// error names their IDs). A clone may also go back to a snapshot of
	// any of its ancestors; the store says which are.
	if si := snap.Info(); si.Kind != snapshot.KindSnapshot || vol.Kind() == snapshot.KindSnapshot {
		return nil, fmt.Errorf("%s is not a snapshot of %s: %w", to, name, errNotSnapshot)
	}
	// Against serve the volume's export stays up and its clients stay
	// connected: the store keeps open handles valid across a rollback,
	// and the export reads through the same handle, so the next read of
	// a connected client returns the rolled-back data. Nothing between
	// the client and the store caches data (the NBD server has no cache).
	if o.progress != nil {
		p := o.progress("rollback " + name)
		p.text("rewriting the chunks that differ from " + to)
		defer p.done()
	}
	if err := o.st.Rollback(ctx, vol, snap); err != nil {
		if errors.Is(err, snapshot.ErrBadOptions) {
			return nil, fmt.Errorf("%s is not a snapshot of %s or of its ancestors: %w", to, name, errNotSnapshot)
		}
		return nil, err
	}
	if err := vol.Flush(); err != nil {
		return nil, err
	}
	return o.volume(name)
}

// checkSnapshot fails unless name is a snapshot, so that a bad export
// request gets an error answer before any stream starts.
func checkSnapshot(st *snapshot.Store, name, role string) error {
	v, err := openSnapshot(st, name, role)
	if err != nil {
		return err
	}
	return v.Close()
}

// liveOf returns the name of the writable volume a snapshot was taken of.
func liveOf(st *snapshot.Store, i snapshot.VolumeInfo) (string, error) {
	if i.Kind != snapshot.KindSnapshot {
		return "", fmt.Errorf("%s is a %s: give TO", i.Name, i.Kind)
	}
	name, ok := nameMap(st)[i.Parent]
	if !ok {
		return "", fmt.Errorf("the volume %s was taken of no longer exists: give TO", i.Name)
	}
	return name, nil
}

func (o *ops) diff(ctx context.Context, from, to string) (control.Diff, error) {
	fv, err := o.st.OpenVolume(from)
	if err != nil {
		return control.Diff{}, err
	}
	defer fv.Close()
	if to == "" {
		if to, err = liveOf(o.st, fv.Info()); err != nil {
			return control.Diff{}, err
		}
	}
	tv, err := o.st.OpenVolume(to)
	if err != nil {
		return control.Diff{}, err
	}
	defer tv.Close()
	out := control.Diff{From: from, To: to, Extents: []control.Extent{}}
	for x, err := range o.st.Diff(fv, tv) {
		if errors.Is(err, snapshot.ErrUnrelated) {
			return control.Diff{}, fmt.Errorf("%s and %s share no history (neither descends from a volume the other does): %w", from, to, errNotSnapshot)
		}
		if err != nil {
			return control.Diff{}, err
		}
		if err := ctx.Err(); err != nil {
			return control.Diff{}, err
		}
		out.Extents = append(out.Extents, control.Extent{Off: x.Off, Len: x.Len, Zero: x.Zero})
		out.Bytes += x.Len
	}
	return out, nil
}

// check runs the store's check and reports each problem on its own.
func (o *ops) check() control.CheckReport {
	rep := o.st.CheckReport()
	return control.CheckReport{OK: rep.OK(), Target: o.storePath, Engine: "snapshot", Volumes: len(o.st.List()),
		Live: o.live, Problems: rep.Problems}
}

func (o *ops) space() control.Space {
	s := o.st.Stats()
	return control.Space{ChunkSize: s.ChunkSize, DataBytes: s.DataBytes, UsedBytes: s.UsedBytes,
		FreeBytes: s.FreeBytes, IndexEntries: s.IndexEntries, MetadataBytes: s.MetadataBytes, JournalFill: s.JournalFill,
		MetadataRegion: s.MetadataRegion, SpaceMapMemory: s.SpaceMapMemory, SpaceMapReads: s.SpaceMapReads}
}

// dump gathers everything the store's API tells about it: each volume
// with its accounting and the extents where it differs from the volume it
// derives from.
func (o *ops) dump(ctx context.Context) (control.Dump, error) {
	origin := o.st.Origin()
	defer origin.Close()
	d := control.Dump{Origin: o.originPath, OriginSize: origin.Size(), Store: o.storePath, StoreSize: o.storeSize,
		BlockSize: origin.BlockSize(), Volumes: []control.DumpVolume{}, Space: o.space()}
	names := nameMap(o.st)
	for _, i := range o.st.List() {
		st, err := o.st.Stat(i.Name)
		if err != nil {
			return d, err
		}
		dv := control.DumpVolume{VolumeStat: control.VolumeStat{Volume: toJSON(i, names), Mapped: st.Mapped, Exclusive: st.Exclusive, Shared: st.Shared}}
		if i.Kind != snapshot.KindOrigin {
			if against, ok := names[i.Parent]; ok {
				diff, err := o.diff(ctx, i.Name, against)
				if err != nil {
					return d, err
				}
				dv.Against, dv.Extents = against, diff.Extents
			}
		}
		d.Volumes = append(d.Volumes, dv)
	}
	d.Check = o.check()
	return d, nil
}
