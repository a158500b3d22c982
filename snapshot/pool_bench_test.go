package snapshot

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// benchPool is a store without an origin of storeSize bytes, 64 KiB
// chunks.
func benchPool(b *testing.B, storeSize int64) *Store {
	store, _ := blockdev.NewMem(storeSize, 4096)
	s, err := Format(nil, store, Options{ChunkSize: 64 << 10, CommitInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

// BenchmarkCreateVolume: one blank 100 GiB volume per op (one record and
// one commit, whatever the size).
func BenchmarkCreateVolume(b *testing.B) {
	s := benchPool(b, 256<<20)
	i := 0
	for b.Loop() {
		i++
		if _, err := s.CreateVolume(fmt.Sprintf("v%d", i), 100<<30); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkResizeGrow: a blank volume grown from 1 GiB to 1 TiB (16M
// chunks of 64 KiB, none of which the chain maps), and a clone of a
// written 64 MiB volume shrunk to 32 MiB and grown back (the regrown half
// is zero-mapped where its parent has data).
func BenchmarkResizeGrow(b *testing.B) {
	b.Run("blank-1GiB-to-1TiB", func(b *testing.B) {
		s := benchPool(b, 256<<20)
		i := 0
		for b.Loop() {
			i++
			name := fmt.Sprintf("v%d", i)
			if _, err := s.CreateVolume(name, 1<<30); err != nil {
				b.Fatal(err)
			}
			if err := s.Resize(name, 1<<40, ResizeOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("clone-regrow-32MiB", func(b *testing.B) {
		s := benchPool(b, 1<<30)
		v, err := s.CreateVolume("v", 64<<20)
		if err != nil {
			b.Fatal(err)
		}
		p := bytes.Repeat([]byte{1}, 1<<20)
		for off := int64(0); off < v.Size(); off += int64(len(p)) {
			if _, err := v.WriteAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		snap, err := s.CreateSnapshot("v@1", v)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.CreateClone("c", snap); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if err := s.Resize("c", 32<<20, ResizeOptions{Shrink: true}); err != nil {
				b.Fatal(err)
			}
			if err := s.Resize("c", 64<<20, ResizeOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkImportSparse: a 256 MiB image, one chunk in eight data, the
// rest holes (a source with AllocationMapper) or zeros it must read
// (without); SetBytes is the image's size.
func BenchmarkImportSparse(b *testing.B) {
	const size, cs = 256 << 20, 64 << 10
	img, _ := blockdev.NewMem(size, 4096)
	p := bytes.Repeat([]byte{7}, cs)
	for off := int64(0); off < size; off += 8 * cs {
		if _, err := img.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		src  blockdev.Device
	}{{"mapper", img}, {"zero-test", plainDevice{img}}} {
		b.Run(tc.name, func(b *testing.B) {
			s := benchPool(b, 1<<30)
			b.SetBytes(size)
			i := 0
			for b.Loop() {
				i++
				name := fmt.Sprintf("g%d", i)
				if _, err := s.Import(b.Context(), name, tc.src, ImportOptions{}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				d, err := s.Delete(name)
				if err == nil {
					err = d.Wait(b.Context())
				}
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
