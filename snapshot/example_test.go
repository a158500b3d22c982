package snapshot_test

import (
	"context"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// A store over an origin and a store device: snapshot the origin, clone
// the snapshot, write to each, list, diff and delete.
func Example() {
	origin, _ := blockdev.NewMem(64<<20, 4096) // the live volume: any Device
	store, _ := blockdev.NewMem(256<<20, 4096) // snapshots and clones share it
	s, err := snapshot.Format(origin, store, snapshot.Options{ChunkSize: 64 << 10})
	if err != nil {
		panic(err)
	}
	defer s.Close()

	live := s.Origin()
	block := make([]byte, 4096)
	copy(block, "version 1")
	live.WriteAt(block, 0)

	snap, _ := s.CreateSnapshot("monday", live) // O(1)
	copy(block, "version 2")
	live.WriteAt(block, 0) // copies the chunk once, for every snapshot

	vm, _ := s.CreateClone("vm-1", snap) // writable, redirect-on-write
	copy(block, "vm-1 data")
	vm.WriteAt(block, 1<<20)

	read := func(d blockdev.Device, off int64) string {
		p := make([]byte, 4096)
		d.ReadAt(p, off)
		return string(p[:9])
	}
	fmt.Println("origin:", read(live, 0))
	fmt.Println("monday:", read(snap, 0))
	fmt.Println("vm-1:  ", read(vm, 0), "/", read(vm, 1<<20))

	for _, v := range s.List() {
		fmt.Println(v.ID, v.Name, v.Kind)
	}
	for e, err := range s.Diff(snap, live) {
		if err != nil {
			panic(err)
		}
		fmt.Printf("changed since monday: %d+%d\n", e.Off, e.Len)
	}

	// Deleting a snapshot that a clone depends on hides it; its space
	// returns when the last clone goes.
	d, _ := s.Delete("vm-1")
	d.Wait(context.Background())
	d, _ = s.Delete("monday")
	d.Wait(context.Background())
	fmt.Println("check:", s.Check(), "used bytes:", s.Stats().UsedBytes)
	// Output:
	// origin: version 2
	// monday: version 1
	// vm-1:   version 1 / vm-1 data
	// 1 origin origin
	// 2 monday snapshot
	// 3 vm-1 clone
	// changed since monday: 0+65536
	// check: <nil> used bytes: 0
}
