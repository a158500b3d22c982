package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/blocksnap/blocksnap/snapshot"
)

// request is one operation, run locally or sent over the control socket
// as one line of JSON.
type request struct {
	Op   string `json:"op"`             // snapshot, clone, delete, list, stat, diff, export-diff
	Name string `json:"name,omitempty"` // the volume created, deleted or stat'ed
	Of   string `json:"of,omitempty"`   // snapshot: the volume to snapshot
	From string `json:"from,omitempty"` // clone: the snapshot; diff: the older volume
	To   string `json:"to,omitempty"`   // diff: the newer volume (default: live); export-diff: the snapshot
}

// volumeJSON is a volume as the command prints it.
type volumeJSON struct {
	ID       uint64    `json:"id"`
	Name     string    `json:"name"`
	Kind     string    `json:"kind"`
	Parent   string    `json:"parent,omitempty"` // name of the parent volume
	ParentID uint64    `json:"parent_id,omitempty"`
	Created  time.Time `json:"created"`
	Size     int64     `json:"size"`
}

type statJSON struct {
	volumeJSON
	Mapped    int64 `json:"mapped"`
	Exclusive int64 `json:"exclusive"`
	Shared    int64 `json:"shared"`
}

type deleteJSON struct {
	Deleted string `json:"deleted"`
	// Reclaimed is the store space freed, when the command waited for it.
	Reclaimed int64 `json:"reclaimed,omitempty"`
	Waited    bool  `json:"waited"`
}

type extentJSON struct {
	Off  int64 `json:"off"`
	Len  int64 `json:"len"`
	Zero bool  `json:"zero,omitempty"`
}

type diffJSON struct {
	From    string       `json:"from"`
	To      string       `json:"to"`
	Extents []extentJSON `json:"extents"`
	Bytes   int64        `json:"bytes"`
}

func toJSON(i snapshot.VolumeInfo, names map[uint64]string) volumeJSON {
	return volumeJSON{ID: i.ID, Name: i.Name, Kind: i.Kind.String(), Parent: names[i.Parent],
		ParentID: i.Parent, Created: i.Created, Size: i.Size}
}

func nameMap(st *snapshot.Store) map[uint64]string {
	m := map[uint64]string{}
	for _, v := range st.List() {
		m[v.ID] = v.Name
	}
	return m
}

// ops runs requests against an open store. The serve command sets the
// hooks to export new volumes and retire deleted ones.
type ops struct {
	st       *snapshot.Store
	onCreate func(v *snapshot.Volume) error // takes ownership of v; nil: v is closed
	onDelete func(name string)
}

func (o *ops) do(ctx context.Context, r request) (any, error) {
	switch r.Op {
	case "snapshot":
		of := r.Of
		if of == "" {
			of = "origin"
		}
		return o.create(r.Name, of, o.st.CreateSnapshot)
	case "clone":
		return o.create(r.Name, r.From, o.st.CreateClone)
	case "delete":
		if _, err := o.st.Delete(r.Name); err != nil {
			return nil, err
		}
		if o.onDelete != nil {
			o.onDelete(r.Name)
		}
		return deleteJSON{Deleted: r.Name}, nil
	case "list":
		names := nameMap(o.st)
		out := []volumeJSON{}
		for _, i := range o.st.List() {
			out = append(out, toJSON(i, names))
		}
		return out, nil
	case "stat":
		s, err := o.st.Stat(r.Name)
		if err != nil {
			return nil, err
		}
		return statJSON{volumeJSON: toJSON(s.VolumeInfo, nameMap(o.st)), Mapped: s.Mapped, Exclusive: s.Exclusive, Shared: s.Shared}, nil
	case "diff":
		return o.diff(ctx, r.From, r.To)
	case "export-diff":
		if _, err := openSnapshotCheck(o.st, r.To, "TO"); err != nil {
			return nil, err
		}
		if r.From != "" {
			if _, err := openSnapshotCheck(o.st, r.From, "--from"); err != nil {
				return nil, err
			}
		}
		return streamer(func(w io.Writer) error {
			_, err := exportStream(ctx, o.st, r.From, r.To, w, func(int64, int64) {})
			return err
		}), nil
	}
	return nil, fmt.Errorf("unknown operation %q", r.Op)
}

func (o *ops) create(name, parent string, make func(string, *snapshot.Volume) (*snapshot.Volume, error)) (any, error) {
	p, err := o.st.OpenVolume(parent)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	v, err := make(name, p)
	if err != nil {
		return nil, err
	}
	info := toJSON(v.Info(), nameMap(o.st))
	if o.onCreate != nil {
		return info, o.onCreate(v)
	}
	return info, v.Close()
}

// openSnapshotCheck reports whether name is a snapshot, so that a bad
// export request gets an error answer before any stream starts.
func openSnapshotCheck(st *snapshot.Store, name, role string) (bool, error) {
	v, err := openSnapshot(st, name, role)
	if err != nil {
		return false, err
	}
	return true, v.Close()
}

// liveOf returns the name of the writable volume a snapshot was taken of.
func liveOf(st *snapshot.Store, v *snapshot.Volume) (string, error) {
	i := v.Info()
	if i.Kind != snapshot.KindSnapshot {
		return "", fmt.Errorf("%s is a %s: give TO", i.Name, i.Kind)
	}
	name, ok := nameMap(st)[i.Parent]
	if !ok {
		return "", fmt.Errorf("the volume %s was taken of no longer exists: give TO", i.Name)
	}
	return name, nil
}

func (o *ops) diff(ctx context.Context, from, to string) (any, error) {
	fv, err := o.st.OpenVolume(from)
	if err != nil {
		return nil, err
	}
	defer fv.Close()
	if to == "" {
		if to, err = liveOf(o.st, fv); err != nil {
			return nil, err
		}
	}
	tv, err := o.st.OpenVolume(to)
	if err != nil {
		return nil, err
	}
	defer tv.Close()
	out := diffJSON{From: from, To: to, Extents: []extentJSON{}}
	for x, err := range o.st.Diff(fv, tv) {
		if err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		out.Extents = append(out.Extents, extentJSON{Off: x.Off, Len: x.Len, Zero: x.Zero})
		out.Bytes += x.Len
	}
	return out, nil
}

// errNoServer: the store is locked and no control socket answers.
var errNoServer = errors.New("no control socket answers")
