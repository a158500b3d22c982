package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/control"
)

// runOp runs r on the store: locally when this process can lock it,
// otherwise through the control socket of the server holding it. out gets
// the result either way, in the control protocol's JSON form.
func runOp(e *env, sf *storeFlags, a access, r control.Request, out any) error {
	s, err := openSession(sf, a)
	if errors.Is(err, ErrStoreInUse) {
		cerr := control.Dial(sf.controlPath()).Call(e.ctx, r, out)
		if errors.Is(cerr, control.ErrNoServer) {
			return inUse(e.ctx, "store", sf.store, sf.controlPath(), "", err)
		}
		return cerr
	}
	if err != nil {
		return err
	}
	o := &ops{st: s.st, originPath: sf.origin, storePath: sf.store, storeSize: s.store.Size(),
		progress: func(what string) *progress { return newProgress(e, what) }}
	res, err := o.do(e.ctx, r)
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

func printVolume(e *env, v control.Volume, js bool, what string) error {
	if js {
		return writeJSON(e.stdout, v)
	}
	of := ""
	if v.Parent != "" {
		of = " of " + v.Parent
	}
	_, err := fmt.Fprintf(e.stdout, "created %s %s%s\n", what, v.Name, of)
	return err
}

var cmdSnapshot = &command{
	name: "snapshot", args: "NAME", lo: 1, hi: 1,
	examples: []string{
		"blocksnap snapshot monday --origin disk.img --store store.img",
		"blocksnap snapshot vm1-before-upgrade --of vm1 --origin disk.img --store store.img",
	},
	summary: "take a read-only snapshot of the origin (or of the clone --of names)",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		of := fs.String("of", "origin", "`VOLUME` to snapshot: the origin or a clone")
		js := fs.Bool("json", false, "print the new volume as JSON")
		return func(e *env, pos []string) error {
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpSnapshot, Name: pos[0], Of: *of}, &v); err != nil {
				return err
			}
			return printVolume(e, v, *js, "snapshot")
		}
	},
}

var cmdClone = &command{
	name: "clone", args: "NAME", lo: 1, hi: 1,
	examples: []string{
		"blocksnap clone vm1 --from golden --origin disk.img --store store.img",
	},
	summary: "make a writable clone of a snapshot",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		from := fs.String("from", "", "`SNAPSHOT` to clone")
		required(fs, "from")
		js := fs.Bool("json", false, "print the new volume as JSON")
		return func(e *env, pos []string) error {
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpClone, Name: pos[0], From: *from}, &v); err != nil {
				return err
			}
			return printVolume(e, v, *js, "clone")
		}
	},
}

var cmdList = &command{
	name:    "list",
	summary: "list the origin, snapshots and clones, and the hidden snapshots clones hang from",
	long: "A hidden snapshot has no name (it shows as (hidden #ID)): one taken implicitly by a clone " +
		"of a live volume, or a snapshot deleted while clones needed it; it goes with its last clone. " +
		"CHILDREN lists the volumes made from each.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print as JSON")
		return func(e *env, _ []string) error {
			var vs []control.Volume
			if err := runOp(e, sf, inspect, control.Request{Op: control.OpList}, &vs); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, vs)
			}
			return printList(e, vs)
		}
	},
}

var cmdDelete = &command{
	name: "delete", args: "NAME", lo: 1, hi: 1,
	summary: "delete a snapshot or clone; waits until its space is reclaimed unless --no-wait",
	long: "A protected volume is refused (unprotect it first). A snapshot that clones depend on is refused too, " +
		"naming them, unless --recursive deletes them first or --detach lets the snapshot go as a hidden " +
		"parent point that its clones keep until the last of them goes. " +
		"Against a running serve a volume that NBD clients are connected to is not deleted unless --force, " +
		"which closes their connections; the volume's export is withdrawn at once " +
		"and the command still waits for the space, unless --no-wait.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		noWait := fs.Bool("no-wait", false, "return once the delete is durable; space is reclaimed in the background")
		force := fs.Bool("force", false, "delete the volume even while NBD clients of a running serve are connected to it, closing their connections")
		recursive := fs.Bool("recursive", false, "delete also the volumes that depend on NAME (a snapshot's clones, their snapshots and clones), deepest first")
		detach := fs.Bool("detach", false, "let a snapshot that clones depend on go as a hidden parent point (list shows it) instead of refusing")
		js := fs.Bool("json", false, "print the result as JSON")
		return func(e *env, pos []string) error {
			var out control.DeleteResult
			r := control.Request{Op: control.OpDelete, Name: pos[0], Wait: !*noWait, Force: *force, Recursive: *recursive, Detach: *detach}
			if err := runOp(e, sf, readWrite, r, &out); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, out)
			}
			if len(out.Dependants) > 0 {
				if _, err := fmt.Fprintf(e.stdout, "deleted %s first\n", strings.Join(out.Dependants, ", ")); err != nil {
					return err
				}
			}
			var err error
			if out.Waited {
				_, err = fmt.Fprintf(e.stdout, "deleted %s; reclaimed %s\n", out.Deleted, human(out.Reclaimed))
			} else {
				_, err = fmt.Fprintf(e.stdout, "deleted %s; space is reclaimed in the background\n", out.Deleted)
			}
			return err
		}
	},
}

var cmdRename = &command{
	name: "rename", args: "NAME NEWNAME", lo: 2, hi: 2,
	summary: "rename a snapshot or clone (a running serve exports it under the new name)",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print the renamed volume as JSON")
		return func(e *env, pos []string) error {
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpRename, Name: pos[0], NewName: pos[1]}, &v); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, v)
			}
			_, err := fmt.Fprintf(e.stdout, "renamed %s to %s\n", pos[0], v.Name)
			return err
		}
	},
}

var cmdRollback = &command{
	name: "rollback", args: "VOLUME", lo: 1, hi: 1,
	examples: []string{
		"blocksnap rollback vm1 --to vm1-before-upgrade --origin disk.img --store store.img",
	},
	summary: "revert the origin or a clone to one of its snapshots, or a clone to a snapshot of its ancestors (later snapshots stay intact)",
	long: "A clone reset to the snapshot it was cloned from moves no data: its chunks inherit again. " +
		"Against a running serve the volume's NBD clients stay connected and read the rolled-back data from " +
		"their next request on (a client that caches what it read, such as a mounted filesystem, must drop " +
		"its cache: stop the VM or unmount first, as for any disk rewritten under it).",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		to := fs.String("to", "", "`SNAPSHOT` of VOLUME, or of one of its ancestors, to roll back to")
		required(fs, "to")
		return func(e *env, pos []string) error {
			var v control.Volume
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpRollback, Name: pos[0], To: *to}, &v); err != nil {
				return err
			}
			_, err := fmt.Fprintf(e.stdout, "rolled %s back to %s\n", pos[0], *to)
			return err
		}
	},
}

var cmdProtect = protectCommand("protect", control.OpProtect,
	"protect a snapshot or clone: delete refuses it, recursive deletes of what it depends on too, until unprotect")

var cmdUnprotect = protectCommand("unprotect", control.OpUnprotect, "lift protect from a snapshot or clone")

func protectCommand(name string, op control.Op, summary string) *command {
	return &command{
		name: name, args: "NAME", lo: 1, hi: 1,
		summary: summary,
		define: func(fs *pflag.FlagSet) func(*env, []string) error {
			sf := addStoreFlags(fs)
			js := fs.Bool("json", false, "print the volume as JSON")
			return func(e *env, pos []string) error {
				var v control.Volume
				if err := runOp(e, sf, readWrite, control.Request{Op: op, Name: pos[0]}, &v); err != nil {
					return err
				}
				if *js {
					return writeJSON(e.stdout, v)
				}
				state := "unprotected"
				if v.Protected {
					state = "protected"
				}
				_, err := fmt.Fprintf(e.stdout, "%s is %s\n", v.Name, state)
				return err
			}
		},
	}
}

var cmdGrow = &command{
	name:    "grow",
	summary: "extend the store's data region onto a store device that has grown (an extended LV, a bigger file), and with --metadata the metadata region",
	long: "Grow the device first (lvextend, truncate -s), then run grow. With --metadata SIZE the metadata region " +
		"also grows by SIZE (rounded up to whole chunks), taken from the free data space at its end, after the data " +
		"region took the device's new space: run it when usage shows the metadata nearly full. " +
		"A running serve opened the device at its old size: restart it to use the new space.",
	examples: []string{
		"truncate -s 20G store.img && blocksnap grow --origin disk.img --store store.img",
		"blocksnap grow --origin disk.img --store store.img --metadata 256M",
	},
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print as JSON")
		md := &sizeFlag{}
		fs.Var(md, "metadata", "also grow the metadata region by `SIZE` (64M, 1G), from the free data space")
		return func(e *env, _ []string) error {
			var g control.GrowResult
			if err := runOp(e, sf, readWrite, control.Request{Op: control.OpGrow, Metadata: md.n}, &g); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, g)
			}
			_, err := fmt.Fprintf(e.stdout, "store %s: data region %s (%s added), metadata region %s (%s added)\n",
				sf.store, human(g.DataBytes), human(g.Added), human(g.MetadataBytes), human(g.MetadataAdded))
			return err
		}
	},
}

var cmdStat = &command{
	name: "stat", args: "NAME", lo: 1, hi: 1,
	summary: "space accounting of a volume: mapped, exclusive and shared bytes",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print as JSON")
		return func(e *env, pos []string) error {
			var st control.VolumeStat
			if err := runOp(e, sf, inspect, control.Request{Op: control.OpStat, Name: pos[0]}, &st); err != nil {
				return err
			}
			if *js {
				return writeJSON(e.stdout, st)
			}
			_, err := fmt.Fprintf(e.stdout, "%s (%s): size %s, mapped %s, exclusive %s, shared %s\n",
				st.Name, st.Kind, human(st.Size), human(st.Mapped), human(st.Exclusive), human(st.Shared))
			return err
		}
	},
}

var cmdUsage = &command{
	name:    "usage",
	summary: "the store's space: data and metadata used and free, index entries, journal fill, the space maps' memory; each volume's with --volumes",
	long: "With --volumes each volume follows with its mapped and exclusive bytes (as stat reports them), " +
		"like lvs -o data_percent,metadata_percent and rbd du.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print as JSON")
		vols := fs.Bool("volumes", false, "also list each volume's mapped and exclusive bytes")
		return func(e *env, _ []string) error {
			var sp control.Space
			if err := runOp(e, sf, inspect, control.Request{Op: control.OpUsage}, &sp); err != nil {
				return err
			}
			var stats []control.VolumeStat
			if *vols {
				var vs []control.Volume
				if err := runOp(e, sf, inspect, control.Request{Op: control.OpList}, &vs); err != nil {
					return err
				}
				for _, v := range vs {
					if v.Hidden {
						continue
					}
					var st control.VolumeStat
					if err := runOp(e, sf, inspect, control.Request{Op: control.OpStat, Name: v.Name}, &st); err != nil {
						return err
					}
					stats = append(stats, st)
				}
			}
			if *js {
				if *vols {
					return writeJSON(e.stdout, struct {
						control.Space
						Volumes []control.VolumeStat `json:"volumes"`
					}{sp, stats})
				}
				return writeJSON(e.stdout, sp)
			}
			pct := func(a, b int64) float64 {
				if b <= 0 {
					return 0
				}
				return float64(a) * 100 / float64(b)
			}
			used, total := sp.UsedBytes, sp.DataBytes
			_, err := fmt.Fprintf(e.stdout, "store %s: data %s used of %s (%.1f%%), %s free; metadata %s used of %s (%.1f%%), %s free; %d index entries, journal %.0f%% full; space maps %s in memory, %d pages read back\n",
				sf.store, human(used), human(total), pct(used, total), human(sp.FreeBytes),
				human(sp.MetadataBytes), human(sp.MetadataRegion), pct(sp.MetadataBytes, sp.MetadataRegion),
				human(sp.MetadataRegion-sp.MetadataBytes), sp.IndexEntries, sp.JournalFill*100, human(sp.SpaceMapMemory), sp.SpaceMapReads)
			for _, st := range stats {
				if err != nil {
					break
				}
				_, err = fmt.Fprintf(e.stdout, "  %-20s %-8s mapped %s, exclusive %s of %s\n", st.Name, st.Kind, human(st.Mapped), human(st.Exclusive), human(st.Size))
			}
			return err
		}
	},
}

var cmdDump = &command{
	name:    "dump",
	summary: "print the store's metadata as JSON: volumes, their extents, space, check result",
	long: "Each snapshot lists the extents where it differs from the volume it was taken of, and each " +
		"clone those where it differs from its snapshot: the chunks it holds in the store for itself.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		return func(e *env, _ []string) error {
			var d control.Dump
			if err := runOp(e, sf, inspect, control.Request{Op: control.OpDump}, &d); err != nil {
				return err
			}
			return writeJSON(e.stdout, d)
		}
	},
}

var cmdDiff = &command{
	name: "diff", args: "FROM [TO]", lo: 1, hi: 2,
	examples: []string{
		"blocksnap diff monday --origin disk.img --store store.img",
		"blocksnap diff monday tuesday --json --origin disk.img --store store.img",
		"blocksnap diff golden vm1-backup --origin disk.img --store store.img",
	},
	summary: "list the extents that differ between two volumes (TO: default the live volume FROM was taken of)",
	long: "FROM and TO may be any two related volumes: snapshots of one volume, a volume and its snapshot, or across clones " +
		"(golden to a snapshot of a clone of it, a snapshot to a later snapshot of a clone of its clone, two clones of one snapshot). " +
		"Zero extents read as zeros in the newer of the two. The answer comes from the store's metadata; no data is read.",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fs)
		js := fs.Bool("json", false, "print as JSON")
		return func(e *env, pos []string) error {
			r := control.Request{Op: control.OpDiff, From: pos[0]}
			if len(pos) == 2 {
				r.To = pos[1]
			}
			var d control.Diff
			if err := runOp(e, sf, inspect, r, &d); err != nil {
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
			_, err := fmt.Fprintf(e.stdout, "%d extents, %s changed from %s to %s\n", len(d.Extents), human(d.Bytes), d.From, d.To)
			return err
		}
	},
}

// printList prints list's table: a hidden volume as (hidden #ID), a
// volume's children by name.
func printList(e *env, vs []control.Volume) error {
	display := map[uint64]string{}
	for _, v := range vs {
		display[v.ID] = v.Name
		if v.Hidden {
			display[v.ID] = fmt.Sprintf("(hidden #%d)", v.ID)
		}
	}
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tKIND\tPARENT\tCHILDREN\tSIZE\tCREATED\tUUID")
	for _, v := range vs {
		children := make([]string, len(v.Children))
		for i, c := range v.Children {
			children[i] = display[c]
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", display[v.ID], v.Kind, dash(display[v.ParentID]), dash(strings.Join(children, ",")),
			human(v.Size), v.Created.Local().Format(time.DateTime), dash(v.UUID))
	}
	return tw.Flush()
}
