package exception_test

import (
	"bytes"
	"context"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/exception"
)

// A snapshot keeps the origin's data as it was when it was taken, in its
// own COW device, here in the Linux kernel's persistent format.
func Example() {
	disk, _ := blockdev.NewMem(1<<20, 512)
	origin, _ := exception.NewOrigin(disk, exception.OriginOptions{})
	_, _ = origin.WriteAt(bytes.Repeat([]byte("A"), 4096), 0)

	cow, _ := blockdev.NewMem(1<<20, 512)
	snap, err := origin.CreateSnapshot(cow, exception.Options{ChunkSize: 4096, Persistent: true})
	if err != nil {
		fmt.Println(err)
		return
	}
	_, _ = origin.WriteAt(bytes.Repeat([]byte("B"), 4096), 0) // copies chunk 0 into the snapshot first

	buf := make([]byte, 512)
	_, _ = snap.ReadAt(buf, 0)
	fmt.Printf("snapshot: %c\n", buf[0])
	_, _ = origin.ReadAt(buf, 0)
	fmt.Printf("origin:   %c\n", buf[0])
	st := snap.Status()
	fmt.Println(st.State, st.Exceptions, "exception")

	_ = snap.Delete() // origin writes stop paying for it at once
	_ = origin.Close()
	// Output:
	// snapshot: A
	// origin:   B
	// valid 1 exception
}

// Merge rolls the origin back to a snapshot, online.
func ExampleSnapshot_Merge() {
	disk, _ := blockdev.NewMem(1<<20, 512)
	origin, _ := exception.NewOrigin(disk, exception.OriginOptions{})
	_, _ = origin.WriteAt(bytes.Repeat([]byte("good"), 1024), 0)
	cow, _ := blockdev.NewMem(1<<20, 512)
	snap, _ := origin.CreateSnapshot(cow, exception.Options{ChunkSize: 4096, Persistent: true})

	_, _ = origin.WriteAt(bytes.Repeat([]byte("oops"), 1024), 0)
	err := snap.Merge(context.Background(), func(p exception.MergeProgress) {
		fmt.Println("merged", p.Merged, "remaining", p.Remaining)
	})
	buf := make([]byte, 512)
	_, _ = origin.ReadAt(buf, 0)
	fmt.Println(err, string(buf[:4]), snap.State())
	// Output:
	// merged 1 remaining 0
	// <nil> good closed
}
