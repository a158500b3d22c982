package blockdev_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// BenchmarkCopy copies a 64 MiB device whose given percentage of 64 KiB
// extents hold data (the rest never written) onto a fresh one: Copy
// against a plain loop that reads and writes everything. Mem devices, so
// that the figures are the copy's own cost, not a disk's; MB/s are of the
// volume size, dst-MiB what the destination ends up holding.
func BenchmarkCopy(b *testing.B) {
	const size = 64 << 20
	for _, pct := range []int{10, 100} {
		src, err := blockdev.NewMem(size, 4096)
		if err != nil {
			b.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(1, 1))
		buf := make([]byte, 64<<10)
		for off := int64(0); off < size; off += int64(len(buf)) {
			if rng.IntN(100) < pct {
				for i := range buf {
					buf[i] = byte(rng.Uint32() | 1)
				}
				if _, err := src.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		}
		for _, mode := range []string{"copy", "loop"} {
			b.Run(fmt.Sprintf("data=%d%%/mode=%s", pct, mode), func(b *testing.B) {
				b.SetBytes(size)
				var held int64
				for b.Loop() {
					dst, err := blockdev.NewMem(size, 4096)
					if err != nil {
						b.Fatal(err)
					}
					if mode == "copy" {
						err = blockdev.Copy(context.Background(), dst, src, nil)
					} else {
						err = plainCopy(dst, src)
					}
					if err != nil {
						b.Fatal(err)
					}
					held = dst.Allocated()
					dst.Close()
				}
				b.ReportMetric(float64(held)/(1<<20), "dst-MiB")
			})
		}
		src.Close()
	}
}

func plainCopy(dst, src blockdev.Device) error {
	buf := blockdev.AlignedBuffer(1 << 20)
	for off := int64(0); off < src.Size(); off += int64(len(buf)) {
		if _, err := src.ReadAt(buf, off); err != nil {
			return err
		}
		if _, err := dst.WriteAt(buf, off); err != nil {
			return err
		}
	}
	return dst.Flush()
}
