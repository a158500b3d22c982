package blockdev_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/blocksnap/blocksnap/blockdev"
)

// A Mem device: sparse, so a 1 TiB device costs only what is written.
func ExampleNewMem() {
	dev, err := blockdev.NewMem(1<<40, 4096)
	if err != nil {
		panic(err)
	}
	defer dev.Close()

	block := make([]byte, dev.BlockSize())
	copy(block, "hello, block")
	if _, err := dev.WriteAt(block, 1<<30); err != nil {
		panic(err)
	}
	got := make([]byte, dev.BlockSize())
	if _, err := dev.ReadAt(got, 1<<30); err != nil {
		panic(err)
	}
	fmt.Printf("%s, %d bytes of memory used\n", got[:12], dev.Allocated())

	// I/O must be block aligned; the error says what was wrong.
	_, err = dev.ReadAt(make([]byte, 100), 0)
	fmt.Println(err)
	// Output:
	// hello, block, 4096 bytes of memory used
	// blockdev: misaligned I/O: offset 0 length 100 block size 4096
}

// A File device over a regular file; the same works on /dev/nvme0n1 or a
// loop device. Flush is fdatasync; Discard punches a hole.
func ExampleCreate() {
	dir, err := os.MkdirTemp("", "blockdev")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)

	dev, err := blockdev.Create(filepath.Join(dir, "disk.img"), 64<<20, blockdev.FileOptions{})
	if err != nil {
		panic(err)
	}
	defer dev.Close()

	data := make([]byte, 8192)
	copy(data, "persistent")
	if _, err := dev.WriteAt(data, 0); err != nil {
		panic(err)
	}
	if err := dev.Flush(); err != nil { // durable from here on
		panic(err)
	}
	if err := dev.Discard(0, 4096); err != nil { // the first block reads as zeros
		panic(err)
	}
	got := make([]byte, 4096)
	if _, err := dev.ReadAt(got, 0); err != nil {
		panic(err)
	}
	fmt.Println(dev.Size(), dev.BlockSize(), blockdev.IsZero(got))
	// Output: 67108864 4096 true
}
