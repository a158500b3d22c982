package diffstream

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// countingWriter counts what it is given and keeps none of it.
type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// BenchmarkExport is a full export of a 64 MiB volume, a quarter of it
// random bytes, a quarter text, half never written, plain and compressed;
// then reading the stream back. MB/s are of the volume; stream-MiB is the
// stream's size.
func BenchmarkExport(b *testing.B) {
	const size = 64 << 20
	m, err := blockdev.NewMem(size, 4096)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	text := bytes.Repeat([]byte("a volume of text compresses well. "), 64<<10/34+1)[:64<<10]
	buf := make([]byte, 64<<10)
	for off := int64(0); off < size; off += int64(len(buf)) {
		switch rng.IntN(4) {
		case 0:
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			m.WriteAt(buf, off)
		case 1:
			m.WriteAt(text, off)
		}
	}
	for _, z := range []bool{false, true} {
		h := Header{To: Identity{ID: "bench"}}
		if z {
			h.Flags |= FlagZstd
		}
		var stream bytes.Buffer
		b.Run(fmt.Sprintf("op=export/zstd=%v", z), func(b *testing.B) {
			b.SetBytes(size)
			var n int64
			for b.Loop() {
				var w countingWriter
				if _, err := Export(context.Background(), &w, m, h, nil, nil); err != nil {
					b.Fatal(err)
				}
				n = w.n
			}
			b.ReportMetric(float64(n)/(1<<20), "stream-MiB")
		})
		if _, err := Export(context.Background(), &stream, m, h, nil, nil); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("op=read/zstd=%v", z), func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				r, err := NewReader(bytes.NewReader(stream.Bytes()))
				if err != nil {
					b.Fatal(err)
				}
				for err == nil {
					_, err = r.Next()
				}
				if err != io.EOF {
					b.Fatal(err)
				}
				r.Close()
			}
		})
	}
}
