package clone_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/clone"
)

// Clone a file image onto another file: the clone is usable at once (reads
// and writes go through it while it hydrates), progress is reported by
// callback, and when it is done the destination file alone holds the image.
func Example() {
	dir, err := os.MkdirTemp("", "clone-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)

	// A 16 MiB "golden image" (in real use: a slow or remote device, such as
	// an NBD export).
	const size = 16 << 20
	img := bytes.Repeat([]byte("golden image "), size/13+1)[:size]
	if err := os.WriteFile(filepath.Join(dir, "golden.img"), img, 0o644); err != nil {
		panic(err)
	}
	src, err := blockdev.Open(filepath.Join(dir, "golden.img"), blockdev.FileOptions{ReadOnly: true})
	if err != nil {
		panic(err)
	}
	defer src.Close()
	dst, err := blockdev.Create(filepath.Join(dir, "vm.img"), size, blockdev.FileOptions{})
	if err != nil {
		panic(err)
	}
	defer dst.Close()
	meta, err := blockdev.Create(filepath.Join(dir, "vm.meta"), clone.MetadataSize(size, 0), blockdev.FileOptions{})
	if err != nil {
		panic(err)
	}
	defer meta.Close()

	var mu sync.Mutex
	var last clone.Status
	c, err := clone.Create(src, dst, meta, clone.Options{
		Progress: func(s clone.Status) {
			mu.Lock()
			last = s // a real program would log s.String()
			mu.Unlock()
		},
		ProgressInterval: 10 * time.Millisecond,
	})
	if err != nil {
		panic(err)
	}

	// Usable at once: write the first block while the image streams in.
	block := make([]byte, c.BlockSize())
	copy(block, "boot sector of the clone")
	if _, err := c.WriteAt(block, 0); err != nil {
		panic(err)
	}
	if err := c.Flush(); err != nil { // durable, with the hydration progress
		panic(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Wait(ctx); err != nil {
		panic(err)
	}
	st := c.Status()
	fmt.Printf("%s: %d/%d regions of %d KiB\n", st.State, st.Hydrated, st.Regions, st.RegionSize>>10)
	if err := c.Close(); err != nil {
		panic(err)
	}
	mu.Lock()
	fmt.Println("last progress report:", last.State)
	mu.Unlock()

	// The destination alone now holds the image with the clone's write.
	got, err := os.ReadFile(filepath.Join(dir, "vm.img"))
	if err != nil {
		panic(err)
	}
	copy(img, block)
	fmt.Println("destination is the image:", bytes.Equal(got, img))
	// Output:
	// hydrated: 256/256 regions of 64 KiB
	// last progress report: hydrated
	// destination is the image: true
}
