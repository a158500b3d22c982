package exception

import (
	"errors"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// FuzzLoadPersistent feeds arbitrary COW device images to CheckCOW, the
// loader and OpenSnapshot (which also runs crash recovery): they must return a typed
// error or a store that reads and checks without panicking.
func FuzzLoadPersistent(f *testing.F) {
	// A store this package wrote, spanning several areas.
	origin := newMem(f, 64<<10, 512)
	o := newOrigin(f, origin)
	cow := newMem(f, 48<<10, 512)
	s, err := o.CreateSnapshot(cow, Options{ChunkSize: 512, Persistent: true})
	if err != nil {
		f.Fatal(err)
	}
	for c := range 40 {
		mustWrite(f, o, fill(byte(c), 512), int64(c*3%128)*512)
	}
	f.Add(readAll(f, cow)) // with a live recovery record
	if err := s.Close(); err != nil {
		f.Fatal(err)
	}
	f.Add(readAll(f, cow))
	// A kernel-style image built by hand, and broken headers.
	img := make([]byte, 16<<10)
	putKernelHeader(img, 1, 1, 8)
	putKernelPair(img, 4096, 0, 0, kpair{3, 2})
	f.Add(img)
	f.Add(append([]byte{'S', 'n', 'A', 'p', 1, 0, 0, 0, 1, 0, 0, 0, 3}, make([]byte, 1024)...))
	f.Add(make([]byte, 512))

	f.Fuzz(func(t *testing.T, data []byte) {
		data = data[:min(len(data), 256<<10)]
		n := len(data) / 512 * 512
		if n == 0 {
			return
		}
		dev, err := blockdev.NewMem(int64(n), 512)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dev.WriteAt(data[:n], 0); err != nil {
			t.Fatal(err)
		}
		// CheckCOW reads the image without writing and agrees with the
		// loader: a store the loader accepts has no bad entry.
		rep, err := CheckCOW(blockdev.ReadOnly(dev), 0)
		if err != nil {
			t.Fatalf("CheckCOW of a readable device: %v", err)
		}
		img, err := LoadPersistent(dev)
		if err == nil && img.Valid && uint64(len(img.Entries)) != rep.Exceptions {
			t.Fatalf("loader found %d exceptions, CheckCOW %d", len(img.Entries), rep.Exceptions)
		}
		if err != nil {
			if !errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrChunkSize) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("untyped error: %v", err)
			}
		} else {
			chunks := uint64(int64(n) / img.ChunkSize)
			seen := map[uint64]bool{}
			for _, e := range img.Entries {
				if e.New == 0 || e.New >= chunks || seen[e.New] {
					t.Fatalf("loader accepted a bad exception %v", e)
				}
				seen[e.New] = true
			}
		}
		o, err := NewOrigin(newMem(t, 64<<10, 512), OriginOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer o.Close()
		s, err := o.OpenSnapshot(dev, Options{})
		if err != nil {
			return
		}
		if s.State() == StateValid {
			buf := make([]byte, 64<<10)
			if _, err := s.ReadAt(buf, 0); err != nil {
				t.Fatalf("read of an opened store: %v", err)
			}
		}
		_, _ = s.Check()
	})
}
