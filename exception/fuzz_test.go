package exception

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// FuzzLoadPersistent feeds arbitrary COW device images to CheckCOW, the
// loader and OpenSnapshot (which also runs crash recovery): they must return a typed
// error or a store that reads and checks without panicking.
// The fuzzer's input is a compact COW image that fuzzImage spreads over a
// fuzzImageSize-byte device of 512-byte blocks, so inputs stay a few hundred
// bytes. Go's engine minimises every new input with a number of tries that
// grows with the square of its length: with whole-device seeds of 48 KiB it
// spent its time minimising (22 execs in 25 s).
//
//	input bytes      image
//	[0, 16)          the header (chunk 0)
//	16               e: the number of exceptions that follow
//	[17, 17+16e)     the exceptions, area by area, at the chunk size the
//	                 header gives (512 if it gives none that fits)
//	[17+16e, end)    the recovery record (the last 1024 bytes), zero-padded;
//	                 its closing CRC is computed here so the fuzzer gets past it
const fuzzImageSize = 16 << 10

func fuzzImage(data []byte) []byte {
	img := make([]byte, fuzzImageSize)
	copy(img, data[:min(len(data), 16)])
	if len(data) <= 16 {
		return img
	}
	cs := int64(binary.LittleEndian.Uint32(img[12:])) * sectorSize
	if checkChunkSize(cs, 512) != nil || 4*cs > fuzzImageSize {
		cs = 512
	}
	epa := uint64(cs / entrySize)
	recOff := recordOffset(fuzzImageSize, 512)
	entries := data[17:min(len(data), 17+16*int(data[16]))]
	for i := uint64(0); 16*i < uint64(len(entries)); i++ {
		at := int64(areaLocation(i/epa, epa))*cs + int64(i%epa)*entrySize
		if at+entrySize > recOff {
			break
		}
		copy(img[at:at+entrySize], entries[16*i:])
	}
	if rec := data[17+len(entries):]; len(rec) > 0 {
		region := img[recOff:]
		copy(region[:recFixed+512], rec)
		binary.LittleEndian.PutUint32(region[recFixed+512:], crc32.Checksum(region[:recFixed+512], castagnoli))
	}
	return img
}

// compactImage is fuzzImage's inverse for an image with 512-byte chunks and
// one area: the seeds come from stores this package wrote.
func compactImage(img []byte) []byte {
	out := append([]byte(nil), img[:16]...)
	var entries []byte
	for i := 0; i < 32; i++ {
		e := img[512+16*i : 512+16*i+16]
		if binary.LittleEndian.Uint64(e[8:]) == 0 {
			break
		}
		entries = append(entries, e...)
	}
	out = append(out, byte(len(entries)/16))
	out = append(out, entries...)
	rec := img[len(img)-1024 : len(img)-1024+recFixed+512]
	return append(out, bytes.TrimRight(rec, "\x00")...)
}

func FuzzLoadPersistent(f *testing.F) {
	// A store this package wrote, with and without a live recovery record.
	origin := blockdevtest.NewMem(f, 64<<10, 512)
	o := newOrigin(f, origin)
	cow := blockdevtest.NewMem(f, fuzzImageSize, 512)
	s, err := o.CreateSnapshot(cow, Options{ChunkSize: 512, Persistent: true})
	if err != nil {
		f.Fatal(err)
	}
	for c := range 20 {
		mustWrite(f, o, blockdevtest.Fill(byte(c), 512), int64(c*3%128)*512)
	}
	live := compactImage(blockdevtest.ReadAll(f, cow))
	f.Add(live)
	if err := s.Close(); err != nil {
		f.Fatal(err)
	}
	f.Add(compactImage(blockdevtest.ReadAll(f, cow)))
	// A kernel-style image (4 KiB chunks, no record), and broken headers.
	kernel := make([]byte, 17+16)
	putKernelHeader(kernel, 1, 1, 8)
	kernel[16] = 1
	binary.LittleEndian.PutUint64(kernel[17:], 3)
	binary.LittleEndian.PutUint64(kernel[25:], 2)
	f.Add(kernel)
	f.Add([]byte{'S', 'n', 'A', 'p', 1, 0, 0, 0, 1, 0, 0, 0, 3})
	f.Add([]byte{})
	if !bytes.Equal(compactImage(fuzzImage(live)), live) {
		f.Fatal("fuzzImage does not invert compactImage")
	}
	if img, err := LoadPersistent(memFrom(f, fuzzImage(live), 512)); err != nil || len(img.Entries) != 20 {
		f.Fatalf("the seed store does not load back: %v", err)
	}

	// One origin for every input, each snapshot detached after it: setup
	// stays out of the loop.
	fo := newOrigin(f, blockdevtest.NewMem(f, 16<<10, 512))
	defer fo.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		o := fo
		data = fuzzImage(data)
		n := len(data)
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
		s, err := o.OpenSnapshot(dev, Options{})
		if err != nil {
			return
		}
		defer func() { _ = s.Close() }()
		if s.State() == StateValid {
			buf := make([]byte, 16<<10)
			if _, err := s.ReadAt(buf, 0); err != nil {
				t.Fatalf("read of an opened store: %v", err)
			}
		}
		_, _ = s.Check()
	})
}
