package blockdev_test

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Copy moves only what the source holds: holes and zero blocks become
// discards on the destination, so a sparse device stays sparse. Equal
// compares two devices, skipping what both report as holes.
func ExampleCopy() {
	src, _ := blockdev.NewMem(1<<30, 4096) // 1 GiB, almost all hole
	dst, _ := blockdev.NewMem(1<<30, 4096)
	block := make([]byte, 4096)
	copy(block, "the only data")
	src.WriteAt(block, 512<<20)

	err := blockdev.Copy(context.Background(), dst, src, nil)
	eq, _, _ := blockdev.Equal(context.Background(), src, dst)
	fmt.Println(err, eq, dst.Allocated())
	// Output: <nil> true 4096
}

// A Writer lets io.Copy write a byte stream of any length, from any
// offset, into a block device: partial blocks at either end keep the
// device's other bytes.
func ExampleNewWriter() {
	dev, _ := blockdev.NewMem(64<<10, 4096)
	w := blockdev.NewWriter(dev, 100) // not block aligned
	n, _ := io.Copy(w, strings.NewReader("a stream that knows nothing of blocks"))
	fmt.Println(n, w.Close())

	got := make([]byte, 4096)
	dev.ReadAt(got, 0)
	fmt.Printf("%q\n", got[100:100+n])
	// Output:
	// 37 <nil>
	// "a stream that knows nothing of blocks"
}
