package snapshot

import "slices"

// Mapping is a run of a volume's chunks that read from the store: volume
// bytes [Off, Off+Len) are store device bytes [StoreOff, StoreOff+Len), or,
// with Zero, read as zeros (discarded) and use no store space.
type Mapping struct {
	Off      int64 `json:"off"`
	Len      int64 `json:"len"`
	StoreOff int64 `json:"store_off,omitempty"`
	Zero     bool  `json:"zero,omitempty"`
}

// Mappings lists where a volume's data lives, as thin_dump lists a thin
// device's mappings: the runs of chunks it reads from the store (through
// its own entries or its ancestors'), in offset order, consecutive chunks
// at consecutive store locations merged into one run. What no run covers
// is read from the origin device (the live origin maps nothing). Metadata
// only: it walks the index entries of the volume's branch and its parent
// chain under the store's lock, as Stat does, and works on a store opened
// read-only.
func (s *Store) Mappings(v *Volume) ([]Mapping, error) {
	if err := v.check(0, 0); err != nil {
		return nil, err
	}
	if v.kind == KindOrigin {
		return nil, nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	var chunks []uint64
	seen := map[uint64]bool{}
	for _, l := range v.levels {
		err := s.ix.branchAscend(l.br.id, func(x entry) bool {
			if !seen[x.c] {
				seen[x.c] = true
				chunks = append(chunks, x.c)
			}
			return true
		})
		if err != nil {
			return nil, metaErr("index walk", err)
		}
	}
	slices.Sort(chunks)
	var out []Mapping
	for _, c := range chunks {
		loc, fromOrigin, err := s.resolveLocked(v.levels, c)
		if err != nil {
			return nil, err
		}
		if fromOrigin {
			continue
		}
		m := Mapping{Off: int64(c) * s.cs, Len: s.chunkLen(c), Zero: loc == locZero}
		if !m.Zero {
			m.StoreOff = s.storeOff(loc)
		}
		if n := len(out); n > 0 {
			p := &out[n-1]
			if p.Off+p.Len == m.Off && p.Zero == m.Zero && (m.Zero || p.StoreOff+p.Len == m.StoreOff) {
				p.Len += m.Len
				continue
			}
		}
		out = append(out, m)
	}
	return out, nil
}
