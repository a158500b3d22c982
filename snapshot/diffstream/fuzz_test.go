package diffstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// maxFuzzInput bounds the inputs FuzzReader runs.
const maxFuzzInput = 2048

// FuzzReader feeds arbitrary bytes to the stream reader and to Apply: they
// must return an error or a verified stream, never panic, and never write
// outside the target. The seeds are valid streams, kept to a few hundred
// bytes: every input that finds new coverage is minimized, and since nearly
// every byte of a stream is under a checksum, minimizing a large input
// takes the fuzzer seconds during which it runs nothing else (seeds of 4
// KiB gave about one exec a second; these give thousands).
//
// Inputs past maxFuzzInput are skipped for the same reason: mutation grows
// inputs, and one long input found interesting held the fuzzer minimizing
// for many seconds. Every check the reader makes is reachable with records
// of a few blocks.
func FuzzReader(f *testing.F) {
	m, err := blockdev.NewMem(8<<10, 512)
	if err != nil {
		f.Fatal(err)
	}
	m.WriteAt(bytes.Repeat([]byte{0xab}, 512), 1024)
	var full bytes.Buffer
	if _, err := Export(context.Background(), &full, m, Header{To: Identity{ID: "t", Name: "to"}}, nil, nil); err != nil {
		f.Fatal(err)
	}
	f.Add(full.Bytes())
	var incr bytes.Buffer
	w, err := NewWriter(&incr, Header{VolumeSize: 8 << 10, BlockSize: 512, From: Identity{ID: "f", UUID: "uf"}, To: Identity{ID: "t", UUID: "ut"}})
	if err != nil {
		f.Fatal(err)
	}
	w.WriteData(512, bytes.Repeat([]byte{1}, 512))
	w.writeRaw(42, []byte("skip me"))
	w.WriteZero(4096, 512)
	w.Close()
	f.Add(incr.Bytes())
	var z bytes.Buffer
	if _, err := Export(context.Background(), &z, m, Header{To: Identity{ID: "t"}, Flags: FlagZstd}, nil, nil); err != nil {
		f.Fatal(err)
	}
	f.Add(z.Bytes())
	f.Add([]byte(Magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > maxFuzzInput {
			return
		}
		r, err := NewReader(bytes.NewReader(b))
		if err != nil {
			return
		}
		h := r.Header()
		for {
			rec, err := r.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("error not ErrCorrupt: %v", err)
				}
				return
			}
			if rec.Off < 0 || rec.Off+rec.Len > h.VolumeSize || (rec.Type == TypeData && int64(len(rec.Data)) != rec.Len) {
				t.Fatalf("record outside the volume: %+v", rec)
			}
		}
		if h.VolumeSize <= 1<<20 {
			target, err := blockdev.NewMem(h.VolumeSize, 512)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Apply(context.Background(), bytes.NewReader(b), target, ApplyOptions{Force: true}); err != nil {
				t.Fatalf("a stream the reader accepts failed to apply: %v", err)
			}
		}
	})
}
