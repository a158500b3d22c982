package snapshot

import (
	"bytes"
	"fmt"
)

// diagSector logs, when the crash torture finds a bad sector at off of v,
// where its contents come from: the index entries of its chunk along the
// chain, what the chunk resolves to, where in the origin and store images
// and in which models' data, durable contents or history the same 512
// bytes appear; then v's pending writes and its last 80 history entries
// (durability points name their cause: a resize names both sizes). It
// found the rollback fault of docs/metadata.md section 30 in one failure.
func (w *workload) diagSector(v *vmodel, off int64, got []byte) {
	s := w.s
	vol := v.vol
	c := uint64(off / s.cs)
	s.mu.RLock()
	br := vol.br
	levels := levelsOf(br, epochLive)
	for _, l := range levels {
		var es []string
		_ = s.ix.ascend(entry{b: l.br.id, c: c}, func(x entry) bool {
			if x.b != l.br.id || x.c != c {
				return false
			}
			es = append(es, fmt.Sprintf("(e%d loc %d)", x.e, x.loc))
			return true
		})
		w.t.Logf("diag: level branch %d epoch %d root %v chain-has %v groups-has %v: %v", l.br.id, l.e, l.br.root, l.br.chainGroups.mayHave(c), l.br.groups.mayHave(c), es)
	}
	loc, fromOrigin, err := s.resolveLocked(levels, c)
	s.mu.RUnlock()
	w.t.Logf("diag: vol %s id %d branch %d size %d chunk %d resolves loc %d fromOrigin %v err %v", v.name, vol.ID(), br.id, vol.Size(), c, loc, fromOrigin, err)
	find := func(what string, d interface {
		ReadAt([]byte, int64) (int, error)
	}, size int64) {
		buf := make([]byte, size)
		_, _ = d.ReadAt(buf, 0)
		for o := 0; o+len(got) <= len(buf); o += 512 {
			if bytes.Equal(buf[o:o+len(got)], got) {
				extra := ""
				if what == "store" && int64(o) >= s.geo.dataOff {
					extra = fmt.Sprintf(" (data chunk %d +%d)", (int64(o)-s.geo.dataOff)/s.cs, (int64(o)-s.geo.dataOff)%s.cs)
				}
				w.t.Logf("diag: bad sector found in %s at %d%s", what, o, extra)
			}
		}
	}
	find("origin", w.origin, w.origin.Size())
	find("store", w.store, w.store.Size())
	for name, m := range w.vols {
		for o := 0; o+512 <= len(m.data); o += 512 {
			if bytes.Equal(m.data[o:o+512], got) {
				w.t.Logf("diag: bad sector = model %s data at %d", name, o)
			}
			if o+512 <= len(m.durable) && bytes.Equal(m.durable[o:o+512], got) {
				w.t.Logf("diag: bad sector = model %s durable at %d", name, o)
			}
		}
		for i, h := range m.history {
			if h.data != nil && h.n > 0 {
				for o := int64(0); o+512 <= int64(len(h.data)); o += 512 {
					if bytes.Equal(h.data[o:o+512], got) {
						w.t.Logf("diag: bad sector = model %s history %d (step %d) at %d", name, i, h.step, h.off+o)
					}
				}
			}
		}
	}
	for _, pw := range v.pending {
		w.t.Logf("diag: pending step %d %d at %d discard %v", pw.step, pw.n, pw.off, pw.data == nil)
	}
	for _, h := range v.history[max(0, len(v.history)-80):] {
		w.t.Logf("diag: hist step %d %d at %d discard %v %s", h.step, h.n, h.off, h.data == nil, map[bool]string{true: string(h.data)}[h.n == 0])
	}
}
