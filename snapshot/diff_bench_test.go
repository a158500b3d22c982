package snapshot

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// BenchmarkDiffAcrossClones times Diff(golden@v1, vm@s), where vm is a
// clone of a clone of golden@v1 (two levels) and vm@s differs from
// golden@v1 in changed chunks, in a store whose index also holds noise
// entries the answer must not cost: origin writes after v1's clone point
// (branch 0 entries at v1's epoch) and a sibling clone's writes. The data
// devices are data-less (the index is real), over a 4 GiB origin of 4 KiB
// chunks.
func BenchmarkDiffAcrossClones(b *testing.B) {
	for _, c := range []struct{ noise, changed int }{{0, 1000}, {100000, 1000}, {100000, 10000}} {
		b.Run(fmt.Sprintf("noise=%d/changed=%d", c.noise, c.changed), func(b *testing.B) {
			benchDiffAcrossClones(b, c.noise, c.changed)
		})
	}
}

func benchDiffAcrossClones(b *testing.B, noise, changed int) {
	const cs = 4096
	const chunks = 1 << 20
	origin, err := blockdevtest.NewNull(chunks*cs, 4096)
	if err != nil {
		b.Fatal(err)
	}
	opts := Options{ChunkSize: cs, JournalSize: 32 << 20, MetadataBytes: 128 << 20, CommitInterval: -1}
	split := int64(1<<20) + opts.JournalSize + opts.MetadataBytes
	head, err := blockdev.NewMem(split, 4096)
	if err != nil {
		b.Fatal(err)
	}
	tail, err := blockdevtest.NewNull(int64(4*(noise+changed)+4096)*cs, 4096)
	if err != nil {
		b.Fatal(err)
	}
	s, err := Format(origin, &blockdevtest.Split{Head: head, Tail: tail, At: split}, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, cs)
	write := func(v *Volume, n int) {
		for range n {
			if _, err := v.WriteAt(buf, rng.Int64N(chunks)*cs); err != nil {
				b.Fatal(err)
			}
		}
	}
	must := func(v *Volume, err error) *Volume {
		if err != nil {
			b.Fatal(err)
		}
		return v
	}
	o := s.Origin()
	v1 := must(s.CreateSnapshot("golden@v1", o))
	vm1 := must(s.CreateClone("vm1", v1))
	write(vm1, changed/2)
	vm1s := must(s.CreateSnapshot("vm1@s", vm1))
	vm2 := must(s.CreateClone("vm2", vm1s))
	write(vm2, changed-changed/2)
	vm2s := must(s.CreateSnapshot("vm2@s", vm2))
	other := must(s.CreateClone("other", v1))
	write(other, noise/2)
	write(o, noise-noise/2)
	if err := s.Checkpoint(b.Context()); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var n int64
	for range b.N {
		n = 0
		for x, err := range s.Diff(v1, vm2s) {
			if err != nil {
				b.Fatal(err)
			}
			n += x.Len / cs
		}
	}
	b.ReportMetric(float64(n), "chunks")
	b.ReportMetric(float64(s.Stats().IndexEntries), "entries")
}
