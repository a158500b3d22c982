package snapshot

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
)

// loadCheckpoint decodes a checkpoint image (checkpoint.go) into the empty
// state of a store being opened (version 1 images, whose entry runs go
// into the index, only when Migrate reads an old store). Every object it creates consumes input
// bytes, so its allocations are bounded by the image's length.
func (s *Store) loadCheckpoint(r io.Reader) error {
	d := &ckptReader{r: bufio.NewReaderSize(r, 64<<10), crc: crc32.New(castagnoli)}
	var salt [4]byte
	binary.LittleEndian.PutUint32(salt[:], saltCheckpoint)
	d.crc.Write(salt[:])
	var hdr [12]byte
	d.read(hdr[:])
	version := binary.LittleEndian.Uint32(hdr[8:])
	known := version == checkpointVersion || version == noBranchCtrVersion || version == noCounterVersion || version == noGroupsVersion ||
		s.migrating && version == oldCheckpointVersion
	if d.err == nil && (string(hdr[:8]) != checkpointMagic || !known) {
		d.fail("bad magic or version %d", version)
	}
	nextVol, nextBr := d.uv(), d.u32()
	// Older images carry no chunk-group summaries: Open rebuilds them.
	s.rebuild = version < noCounterVersion
	s.ctr = counters{stale: true} // loading the holders changes no counter
	s.loadBranches(d, version >= noCounterVersion)
	s.loadVolumes(d)
	if version >= noBranchCtrVersion {
		s.loadCounters(d) // else they stay stale: Open rebuilds them
		s.ctr.brStale = true
		if version >= checkpointVersion && !s.ctr.stale {
			s.loadBranchCounters(d)
		} else if version >= checkpointVersion && d.uv() != 0 && d.err == nil {
			d.fail("branch counters without the origin's")
		}
	}
	if version == oldCheckpointVersion {
		s.loadRuns(d)
	} else if tag := d.byte1(); tag != 0 && d.err == nil {
		d.fail("entry runs in a version %d image", version)
	}
	if d.err != nil {
		return d.err
	}
	want := d.crc.Sum32()
	var sum [4]byte
	if _, err := io.ReadFull(d.r, sum[:]); err != nil {
		d.fail("missing checksum")
		return d.err
	}
	if got := binary.LittleEndian.Uint32(sum[:]); got != want {
		d.fail("checksum %#x, want %#x", got, want)
		return d.err
	}
	if nextVol > s.nextVol {
		s.nextVol = nextVol
	}
	if nextBr > s.nextBranch {
		s.nextBranch = nextBr
	}
	return nil
}

func (s *Store) loadBranches(d *ckptReader, groups bool) {
	n := d.uv()
	for i := uint64(0); i < n && d.err == nil; i++ {
		id, parent, pe, last, live := d.u32(), d.u32(), d.u32(), d.u32(), d.uv()
		if d.err != nil {
			return
		}
		if id == 0 {
			s.b0.lastEpoch = last
			if groups {
				s.loadGroups(d, s.b0)
			}
			continue
		}
		p := s.branches[parent]
		if parent == id && pe == 0 && s.branches[id] == nil && live <= 1 { // a root branch (CreateVolume)
			s.loadRootBranch(id, last, live == 1)
			if groups {
				s.loadGroups(d, s.branches[id])
			}
			continue
		}
		if p == nil || s.branches[id] != nil || parent >= id || live > 1 || pe == 0 || pe > p.lastEpoch {
			d.fail("branch %d (parent %d at %d)", id, parent, pe)
			return
		}
		br := s.newBranch(id, parent, pe)
		br.lastEpoch, br.live = last, live == 1
		s.branches[id] = br
		p.ref(pe, 1)
		if id >= s.nextBranch {
			s.nextBranch = id + 1
		}
		if groups {
			s.loadGroups(d, br)
		}
	}
}

// loadGroups reads a branch's chunk-group summary (encodeGroups) and sets
// its bits with markGroups, which also builds the chain summaries: the
// image lists parents before their clones (parent < id). The words must
// be increasing, non-zero and within the summary's size, and no bit may
// lie past the last chunk's group.
func (s *Store) loadGroups(d *ckptReader, br *branch) {
	words := uint64(len(br.groups.bits))
	shift := br.groups.shift
	n := d.uv()
	if n > words {
		d.fail("branch %d: %d summary words, at most %d", br.id, n, words)
		return
	}
	idx := uint64(0)
	for k := uint64(0); k < n && d.err == nil; k++ {
		delta, w := d.uv(), d.uv()
		idx += delta
		if d.err != nil {
			return
		}
		if k > 0 && delta == 0 || idx >= words || w == 0 {
			d.fail("branch %d: summary word %d (%#x)", br.id, idx, w)
			return
		}
		for ; w != 0; w &= w - 1 {
			g := idx*64 + uint64(bits.TrailingZeros64(w))
			if bound := s.chunkBound(br.id); g<<shift >= bound {
				d.fail("branch %d: summary group %d past the last chunk %d", br.id, g, bound-1)
				return
			}
			markGroups(br, g<<shift, 1)
		}
	}
}

func (s *Store) loadVolumes(d *ckptReader) {
	s.volAll = true // the fields set here bypass applyOp
	n := d.uv()
	for i := uint64(0); i < n && d.err == nil; i++ {
		o := op{kind: opVolume}
		o.id = d.uv()
		k := d.uv()
		o.b, o.e = d.u32(), d.u32()
		h := d.uv()
		o.time = d.sv()
		o.parent = d.uv()
		if h&flagCkptSize != 0 {
			o.size = int64(d.uv())
		}
		ln := d.uv()
		if d.err != nil {
			return
		}
		if ln > maxNameLen || k < uint64(KindSnapshot) || k > uint64(KindClone) || h > 7 || o.size < 0 || o.size > maxVolumeBound {
			d.fail("volume %d: kind %d, hidden %d, name of %d bytes", o.id, k, h, ln)
			return
		}
		name := make([]byte, ln)
		d.read(name)
		o.vkind, o.hidden, o.name = Kind(k), h&1 == 1, string(name)
		if d.err != nil {
			return
		}
		br := s.branches[o.b]
		if br == nil {
			d.fail("volume %d on missing branch %d", o.id, o.b)
			return
		}
		// applyVolume checks the epoch against lastEpoch, which the image
		// already holds; lower it for the check.
		last := br.lastEpoch
		if o.vkind == KindSnapshot {
			br.lastEpoch = o.e - 1
		}
		err := s.applyVolume(&o, func(format string, args ...any) error { d.fail(format, args...); return d.err })
		if o.vkind == KindSnapshot && last > br.lastEpoch {
			br.lastEpoch = last
		}
		if err != nil {
			return
		}
		s.volumes[o.id].protected = h&2 != 0 && !o.hidden
		if o.size != 0 {
			s.volumes[o.id].size.Store(o.size)
		}
		if o.vkind == KindClone && !br.live {
			d.fail("clone volume %d on dead branch %d", o.id, o.b)
			return
		}
	}
}

func (d *ckptReader) sv() int64 {
	u := d.uv()
	return int64(u>>1) ^ -int64(u&1)
}

// afterReplay queues the collection of whatever a delete left unfinished:
// entries at epochs nothing holds, and dead branches.
func (s *Store) afterReplay() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, br := range s.branches {
		err := s.ix.branchEpochs(br.id, func(e uint32) bool {
			if br.refs[e] <= 0 && !(e == epochLive && br.live) {
				s.queueGC(point{br.id, e})
			}
			return true
		})
		if err != nil {
			return metaErr("scan branch epochs", err)
		}
		if br.dead() {
			s.queueGC(point{br.id, epochLive})
		}
	}
	return nil
}

// rebuildSummaries rebuilds, from the index, what the store keeps in
// memory beside it: each branch's chunk-group bits (the origin's preserved
// epochs stay unknown until looked up, preserve.go). It is one walk of the chunk tree, in key order, so it
// reads every leaf once: its cost grows with the index entries (about 11
// bytes of leaf each). Open runs it only for a checkpoint image older than
// the summaries (version 2); the next tree commit writes them.
func (s *Store) rebuildSummaries() error {
	var bad error
	err := s.ix.ascend(entry{}, func(x entry) bool {
		br := s.branches[x.b]
		if br == nil {
			bad = fmt.Errorf("%w: index entry (%d,%d,%d) of unknown branch %d", ErrCorrupt, x.b, x.c, x.e, x.b)
			return false
		}
		if lim := s.chunkBound(x.b); x.c >= lim {
			bad = fmt.Errorf("%w: index entry (%d,%d,%d) past the chunk space's %d chunks", ErrCorrupt, x.b, x.c, x.e, lim)
			return false
		}
		markGroups(br, x.c, 1)
		return true
	})
	if err != nil {
		return metaErr("rebuild summaries", err)
	}
	return bad
}

func (s *Store) loadRuns(d *ckptReader) {
	var pb, pe uint32
	var prevEnd, locEnd uint64
	first := true
	for d.err == nil {
		tag := d.byte1()
		if tag == 0 || d.err != nil {
			return
		}
		o := op{kind: opPut}
		switch {
		case tag == 1:
			o.b, o.e, o.c = d.u32(), d.u32(), d.uv()
		case tag == 2 && !first:
			o.b, o.e = pb, pe
			o.c = prevEnd + d.uv()
		default:
			d.fail("run tag %d", tag)
			return
		}
		o.n = d.uv()
		lv := d.uv()
		if d.err != nil {
			return
		}
		switch lv {
		case 0:
			o.loc = locZero
		case 1:
			o.loc = locInherit
		default:
			z := lv - 2
			delta := int64(z>>1) ^ -int64(z&1)
			o.loc = locEnd + uint64(delta)
			if o.loc >= locInherit {
				d.fail("run location %d", o.loc)
				return
			}
			locEnd = o.loc + o.n
		}
		if o.n == 0 || o.n > s.chunks || o.c >= s.chunks {
			d.fail("run of %d chunks at chunk %d", o.n, o.c)
			return
		}
		if err := s.applyOp(&o, 0, true); err != nil {
			d.fail("%v", err)
			return
		}
		first, pb, pe, prevEnd = false, o.b, o.e, o.c+o.n
	}
}
