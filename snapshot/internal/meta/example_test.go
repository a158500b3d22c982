package meta_test

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Example: format a region, map chunks, commit, and read a committed view
// while the writer goes on.
func Example() {
	dev, _ := blockdev.NewMem(1024*meta.PageSize, 4096)
	m, err := meta.Format(dev, meta.Options{DataChunks: 1 << 16})
	if err != nil {
		panic(err)
	}
	for c := uint64(0); c < 1000; c++ { // a sequential fill: one run
		if _, err := m.PutData(meta.Key{B: 0, C: c, E: 1}); err != nil {
			panic(err)
		}
	}
	if err := m.Commit(); err != nil {
		panic(err)
	}
	v := m.View()
	defer v.Release()
	_, _ = m.PutData(meta.Key{B: 0, C: 5000, E: 1}) // not in the view

	k, loc, ok, _ := v.Seek(meta.Key{B: 0, C: 500, E: 0}) // first key at or after (0, 500, 0)
	fmt.Println(k, loc, ok, v.Len(), m.Len(), m.Stats().ChunkRuns)
	fmt.Println(v.Check())
	// Output:
	// {0 500 1} 500 true 1000 1001 2
	// <nil>
}
