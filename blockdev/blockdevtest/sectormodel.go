package blockdevtest

import (
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
)

// SectorModel is what a crash may leave of a set of volumes, sector by
// sector (512 bytes), kept outside the devices under test: the crash model's
// rules as one checker.
//
//  1. A write completed before the volume's last completed Flush survives.
//  2. A write not covered by a Flush may survive whole, in part (per
//     sector) or not at all; a sector never holds bytes never written to
//     that address of that volume (under Tear, a sector written since the
//     flush may hold anything).
//  3. A snapshot never changes (Snapshot: it takes no writes).
//  4. After a crash, the engine opens and its Check passes (Verify runs the
//     engine's check).
//
// Tests record each operation once it returns (Write, Discard, Flush; Failed
// for one that returned an error, which may have landed in part), and after
// a crash call Verify (or CheckCrash per volume) with what the recovered
// volumes read. It is not safe for concurrent use: writers that run in
// parallel record under their own lock.
type SectorModel struct {
	vols  map[string]*sectorVol
	order []string
}

// sectorVol is one volume: what reads see now, what the last flush made
// durable, and the values each sector may hold after a crash besides the
// durable one (as hashes, so a long run keeps little).
type sectorVol struct {
	cur, stable []byte
	cands       map[int64][]uint64
	unsure      map[int64]bool // a failed write may or may not have changed these
	frozen      bool
}

var sectorSeed = maphash.MakeSeed()

func sectorHash(p []byte) uint64 { return maphash.Bytes(sectorSeed, p) }

// NewSectorModel returns an empty model.
func NewSectorModel() *SectorModel { return &SectorModel{vols: map[string]*sectorVol{}} }

// Add adds a volume whose content img is durable (a new volume, or one just
// recovered). img is copied.
func (m *SectorModel) Add(name string, img []byte) {
	if _, ok := m.vols[name]; !ok {
		m.order = append(m.order, name)
	}
	m.vols[name] = &sectorVol{cur: bytes.Clone(img), stable: bytes.Clone(img),
		cands: map[int64][]uint64{}, unsure: map[int64]bool{}}
}

// Snapshot adds name as a snapshot of volume of, taken now and durable (the
// engine committed it before returning): it holds of's current content for
// ever (rule 3), where a failed write to of may or may not have landed
// before it was taken. A writable clone is Add(name, m.Current(of)).
func (m *SectorModel) Snapshot(name, of string) {
	src := m.vol(of)
	m.Add(name, src.cur)
	v := m.vols[name]
	v.frozen = true
	for s := range src.unsure {
		v.unsure[s] = true
		v.cands[s] = slices.Clone(src.cands[s])
	}
}

// Delete forgets a volume.
func (m *SectorModel) Delete(name string) {
	delete(m.vols, name)
	m.order = slices.DeleteFunc(m.order, func(s string) bool { return s == name })
}

// Volumes returns the volumes' names in the order they were added.
func (m *SectorModel) Volumes() []string { return slices.Clone(m.order) }

func (m *SectorModel) vol(name string) *sectorVol {
	v, ok := m.vols[name]
	if !ok {
		panic(fmt.Sprintf("blockdevtest: SectorModel has no volume %q", name))
	}
	return v
}

// Current returns what reads of the volume see now (not a copy). Where a
// failed write may have landed it holds the value before that write; use
// CheckRead to compare reads.
func (m *SectorModel) Current(name string) []byte { return m.vol(name).cur }

// Write records a completed write of p at off.
func (m *SectorModel) Write(name string, off int64, p []byte) {
	m.record(name, off, int64(len(p)), p, true)
}

// Discard records a completed discard (or write of zeroes) of n bytes at off.
func (m *SectorModel) Discard(name string, off, n int64) { m.record(name, off, n, nil, true) }

// Failed records a write (p) or discard (p nil, n bytes) that returned an
// error: any of its sectors may have landed, now or after a crash.
func (m *SectorModel) Failed(name string, off, n int64, p []byte) { m.record(name, off, n, p, false) }

func (m *SectorModel) record(name string, off, n int64, p []byte, done bool) {
	v := m.vol(name)
	if v.frozen {
		panic(fmt.Sprintf("blockdevtest: SectorModel: write to snapshot %q", name))
	}
	var zero [SectorSize]byte
	for i := int64(0); i < n; i += SectorSize {
		src := zero[:]
		if p != nil {
			src = p[i : i+SectorSize]
		}
		s := (off + i) / SectorSize
		v.cands[s] = append(v.cands[s], sectorHash(src))
		if done {
			copy(v.cur[off+i:], src)
			delete(v.unsure, s)
		} else {
			v.unsure[s] = true
		}
	}
}

// Flush records a completed Flush of the volume: everything written to it
// so far is durable (sectors a failed write touched stay unsure).
func (m *SectorModel) Flush(name string) {
	v := m.vol(name)
	copy(v.stable, v.cur)
	for s := range v.cands {
		if !v.unsure[s] {
			delete(v.cands, s)
		}
	}
}

// FlushAll is Flush of every volume.
func (m *SectorModel) FlushAll() {
	for _, name := range m.order {
		m.Flush(name)
	}
}

// CheckRead checks a read of the volume before any crash: each sector reads
// as last written, or, where a failed write touched it, its value before or
// any value written since the last flush.
func (m *SectorModel) CheckRead(name string, off int64, got []byte) error {
	v := m.vol(name)
	for i := int64(0); i < int64(len(got)); i += SectorSize {
		s := (off + i) / SectorSize
		g := got[i : i+SectorSize]
		if bytes.Equal(g, v.cur[off+i:off+i+SectorSize]) {
			continue
		}
		if !v.unsure[s] || !v.allowed(s, g) {
			return fmt.Errorf("volume %s: sector %d (byte %d) reads data not the last written there", name, s, s*SectorSize)
		}
	}
	return nil
}

// Observe is CheckRead that also settles the sectors a failed write left
// unsure: what the read returned is what they hold until written again (a
// crash may still leave any value written since the last flush).
func (m *SectorModel) Observe(name string, off int64, got []byte) error {
	if err := m.CheckRead(name, off, got); err != nil {
		return err
	}
	v := m.vol(name)
	for i := int64(0); i < int64(len(got)); i += SectorSize {
		s := (off + i) / SectorSize
		if v.unsure[s] {
			copy(v.cur[off+i:off+i+SectorSize], got[i:i+SectorSize])
			delete(v.unsure, s)
		}
	}
	return nil
}

func (v *sectorVol) allowed(s int64, g []byte) bool {
	if bytes.Equal(g, v.stable[s*SectorSize:(s+1)*SectorSize]) {
		return true
	}
	h := sectorHash(g)
	return slices.Contains(v.cands[s], h)
}

// CheckCrash checks what the volume reads after a crash with the given
// mode against rules 1 to 3.
func (m *SectorModel) CheckCrash(name string, got []byte, mode Mode) error {
	v := m.vol(name)
	if len(got) != len(v.stable) {
		return fmt.Errorf("volume %s: %d bytes after the crash, %d before", name, len(got), len(v.stable))
	}
	for s := int64(0); s < int64(len(got))/SectorSize; s++ {
		g := got[s*SectorSize : (s+1)*SectorSize]
		if v.allowed(s, g) || mode == Tear && len(v.cands[s]) > 0 {
			continue
		}
		if v.frozen {
			return fmt.Errorf("volume %s (a snapshot): sector %d (byte %d) changed", name, s, s*SectorSize)
		}
		if len(v.cands[s]) == 0 {
			return fmt.Errorf("volume %s: sector %d (byte %d) lost its flushed data (nothing written there since the last flush)", name, s, s*SectorSize)
		}
		return fmt.Errorf("volume %s: sector %d (byte %d) holds data never written there (%d writes since the last flush)", name, s, s*SectorSize, len(v.cands[s]))
	}
	return nil
}

// Recovered makes what the volume reads after a crash its durable content.
func (m *SectorModel) Recovered(name string, got []byte) {
	v := m.vol(name)
	copy(v.cur, got)
	copy(v.stable, got)
	clear(v.cands)
	clear(v.unsure)
}

// Verify checks every volume after a crash with the given mode: rule 4 with
// check (the engine's own Check, run first; nil skips it), then rules 1 to 3
// with what read returns for each volume. On success each volume's content
// becomes its durable content (Recovered), so the run can go on.
func (m *SectorModel) Verify(mode Mode, read func(name string) ([]byte, error), check func() error) error {
	if check != nil {
		if err := check(); err != nil {
			return fmt.Errorf("check after the crash: %w", err)
		}
	}
	imgs := make(map[string][]byte, len(m.order))
	var errs []error
	for _, name := range m.order {
		got, err := read(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: read after the crash: %w", name, err))
			continue
		}
		if err := m.CheckCrash(name, got, mode); err != nil {
			errs = append(errs, err)
		}
		imgs[name] = got
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for name, got := range imgs {
		m.Recovered(name, got)
	}
	return nil
}
