package snapshot

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// Early, loud checks for the model workload (issue 13's unexplained
// "diff ... misses chunk" in the tiny-metadata-cache torture). The torture
// compares snapshots with the model only after a crash, so a copy-on-write
// skipped between two crashes would first show as a Diff that misses a
// chunk, steps later and without saying which step lost the data. In the
// tiny-cache configuration the torture and TestModelWorkloadTinyCache call
// tortchaseVerifyAll after every step instead: every volume must read as
// the model says at the step that broke it.

// tortchaseVerifyAll reads every volume the model knows and compares it
// with the model. A read error is returned (under failOK it ends the run
// like any failed step: the torture's power cut fails reads too); a
// difference fails the test, saying whether a snapshot reads its parent's
// current data there (a skipped copy-on-write) or something else.
func (w *workload) tortchaseVerifyAll() error {
	w.t.Helper()
	for _, name := range w.names(nil) {
		v := w.vols[name]
		if v.vol == nil {
			continue
		}
		if got := v.vol.Size(); got != int64(len(v.data)) {
			w.t.Fatalf("seed %d step %d (%s): volume %s of %d bytes, want %d", w.seed, w.steps, w.why, name, got, len(v.data))
		}
		buf := make([]byte, len(v.data))
		if _, err := v.vol.ReadAt(buf, 0); err != nil {
			if w.failOK {
				return fmt.Errorf("read %s: %w", name, err)
			}
			w.must(err, "read %s", name)
		}
		i := blockdevtest.FirstDiff(buf, v.data)
		if i < 0 {
			continue
		}
		c := int64(i) / w.s.cs
		lo, hi := c*w.s.cs, min((c+1)*w.s.cs, int64(len(buf)))
		how := "reads neither the model nor its parent"
		if p := w.vols[v.parent]; v.kind == KindSnapshot && p != nil && int64(len(p.data)) >= hi &&
			blockdevtest.FirstDiff(buf[lo:hi], p.data[lo:hi]) < 0 {
			how = "reads its parent " + p.name + "'s current data there: a skipped copy-on-write"
		}
		w.t.Fatalf("seed %d step %d (last op %q): volume %s (%v) differs from the model at byte %d (chunk %d) and %s",
			w.seed, w.steps, w.why, name, v.kind, i, c, how)
	}
	return nil
}
