package snapshot

import "slices"

// ListAll returns every volume, ordered by ID: the visible ones List
// returns, and the hidden snapshots that clones hang from (Hidden set,
// Name empty), so that a tool can draw the whole tree: every Parent of a
// volume ListAll returns is 0 or the ID of another it returns.
func (s *Store) ListAll() []VolumeInfo {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]VolumeInfo, 0, len(s.volumes))
	for _, v := range s.volumes {
		if v.kind == KindOrigin && s.geo.noOrigin {
			continue
		}
		i := s.infoLocked(v)
		if v.hidden {
			i.Name = "" // a deleted snapshot's old name is free for reuse
		}
		out = append(out, i)
	}
	slices.SortFunc(out, func(a, b VolumeInfo) int {
		if a.ID < b.ID {
			return -1
		}
		return 1
	})
	return out
}
