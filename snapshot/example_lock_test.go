package snapshot_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// A store is used by one Store at a time: a second Open, here or in another
// process, is refused until the first is closed. A read-only origin is a
// golden image: its writes fail, clones of it are writable.
func ExampleOpen_locked() {
	dir, _ := os.MkdirTemp("", "blocksnap-example")
	defer os.RemoveAll(dir)
	golden, _ := blockdev.Create(filepath.Join(dir, "golden.img"), 16<<20, blockdev.FileOptions{})
	golden.Close()
	ro, _ := blockdev.Open(filepath.Join(dir, "golden.img"), blockdev.FileOptions{ReadOnly: true})
	defer ro.Close()
	storeDev, _ := blockdev.Create(filepath.Join(dir, "store.img"), 64<<20, blockdev.FileOptions{})
	defer storeDev.Close()

	s, err := snapshot.Format(ro, storeDev, snapshot.Options{})
	if err != nil {
		panic(err)
	}
	again, _ := blockdev.Open(filepath.Join(dir, "store.img"), blockdev.FileOptions{})
	defer again.Close()
	_, err = snapshot.Open(ro, again, snapshot.Options{})
	fmt.Println("second open refused:", errors.Is(err, snapshot.ErrLocked))

	_, err = s.Origin().WriteAt(make([]byte, 4096), 0)
	fmt.Println("golden write refused:", errors.Is(err, snapshot.ErrReadOnly))
	vm, _ := s.CreateClone("vm1", s.Origin())
	_, err = vm.WriteAt(make([]byte, 4096), 0)
	fmt.Println("clone write:", err)

	s.Close()
	s, err = snapshot.Open(ro, again, snapshot.Options{})
	fmt.Println("open after close:", err)
	s.Close()
	// Output:
	// second open refused: true
	// golden write refused: true
	// clone write: <nil>
	// open after close: <nil>
}
