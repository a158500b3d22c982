package snapshot

import (
	"context"
	"fmt"
	"io"

	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

// Identity is the volume's stable identity in diff streams and in the
// state a target of ApplyDiff keeps: its ID in the store and its creation
// time (both survive reopen), its UUID (unique across stores), and its
// name for people. This is the one place it is built: every exporter
// (ExportDiff, the command line, the examples) names volumes through it,
// so a target's state matches the next stream's From.
//
// The UUID is VolumeInfo.UUID, which streams written before volumes had
// UUIDs carried too (derived the same way, from the store's UUID, the ID
// and the creation time), so no volume's identity changed with it.
func (v *Volume) Identity() diffstream.Identity {
	i := v.Info()
	return diffstream.Identity{ID: fmt.Sprintf("%d-%d", i.ID, i.Created.UnixNano()), Name: i.Name, UUID: i.UUID.String()}
}

// ExportOptions configures ExportDiff. The zero value is a good default.
type ExportOptions struct {
	// Compress writes a zstd-compressed stream (diffstream version 2,
	// which readers before it refuse by version).
	Compress bool
	// Progress, if set, is called as the export proceeds with the volume
	// bytes covered so far and the total it will cover, known from the
	// start (the volume's size for a full export, the changed bytes for
	// an incremental one).
	Progress func(done, total int64)
}

// ExportDiff writes to w the diff stream that takes a volume from snapshot
// from to snapshot to (an incremental, as `zfs send -i`), or, with from nil,
// the whole of to (a full, sparse export). Both must be snapshots (frozen
// contents); for a live volume, take a snapshot first. from and to may be
// any pair Diff relates: snapshots of one volume (either order), or
// across clones, such as golden@v1 and a snapshot of a clone of it (as
// `zfs send -i golden@v1 vm1@snap`); applied onto a copy of from, the
// stream gives to. The stream is as large as to; Apply refuses a target of
// another size, so a copy of a smaller or larger from is resized first.
//
// The stream names both ends by Volume.Identity and records the store's
// chunk size. The changed extents come from Diff (metadata only); those
// Diff marks Zero are sent as ZERO records without reading data only when
// to is the newer side, since Diff's Zero describes the newer volume (an
// export backwards in time reads those chunks and sends what to holds).
// All-zero blocks read from to are sent as ZERO records either way.
func (s *Store) ExportDiff(ctx context.Context, w io.Writer, from, to *Volume, opts ExportOptions) (diffstream.Totals, error) {
	for _, v := range []*Volume{from, to} {
		if v == nil {
			continue
		}
		if err := v.check(0, 0); err != nil {
			return diffstream.Totals{}, err
		}
		if v.kind != KindSnapshot {
			return diffstream.Totals{}, fmt.Errorf("%w: export of %s %q: exports read snapshots (take one first)", ErrBadOptions, v.kind, v.Info().Name)
		}
	}
	if to == nil {
		return diffstream.Totals{}, fmt.Errorf("%w: export needs the snapshot to export", ErrBadOptions)
	}
	h := diffstream.Header{To: to.Identity(), ChunkSize: int(s.cs)}
	if opts.Compress {
		h.Flags |= diffstream.FlagZstd
	}
	total := to.Size()
	var extents func(func(Extent, error) bool)
	if from != nil {
		h.From = from.Identity()
		// Collected first (metadata only, a few words per extent) so
		// that progress knows its total.
		var list []Extent
		total = 0
		for x, err := range s.diff(from, to, to) {
			if err != nil {
				return diffstream.Totals{}, err
			}
			// Past to's end (from is larger) the stream has nothing to
			// say: it is as large as to.
			if x.Len = min(x.Len, to.Size()-x.Off); x.Len <= 0 {
				break
			}
			list = append(list, x)
			total += x.Len
		}
		extents = func(yield func(Extent, error) bool) {
			for _, x := range list {
				if !yield(x, nil) {
					return
				}
			}
		}
	}
	var progress func(diffstream.Progress)
	if opts.Progress != nil {
		progress = func(p diffstream.Progress) { opts.Progress(p.Done, total) }
	}
	return diffstream.Export(ctx, w, to, h, extents, progress)
}
