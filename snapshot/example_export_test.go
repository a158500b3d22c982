package snapshot_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

// Back up a volume as a full export then incrementals, restore them onto
// a blank device, and inspect the store read-only.
func ExampleStore_ExportDiff() {
	ctx := context.Background()
	origin, _ := blockdev.NewMem(64<<20, 4096)
	store, _ := blockdev.NewMem(256<<20, 4096)
	s, _ := snapshot.Format(origin, store, snapshot.Options{})
	live := s.Origin()
	block := make([]byte, 4096)
	copy(block, "monday")
	live.WriteAt(block, 0)
	mon, _ := s.CreateSnapshot("monday", live)
	copy(block, "tuesday")
	live.WriteAt(block, 8<<20)
	tue, _ := s.CreateSnapshot("tuesday", live)

	restore, _ := blockdev.NewMem(64<<20, 4096)
	dir, _ := os.MkdirTemp("", "export")
	defer os.RemoveAll(dir)
	// The state file says which snapshot the target holds, so that an
	// incremental applies only onto its FROM.
	state := diffstream.ApplyOptions{StatePath: filepath.Join(dir, "restore.bsstate")}
	for _, pair := range [][2]*snapshot.Volume{{nil, mon}, {mon, tue}} {
		var stream bytes.Buffer
		tot, _ := s.ExportDiff(ctx, &stream, pair[0], pair[1], snapshot.ExportOptions{Compress: true})
		res, err := diffstream.Apply(ctx, &stream, restore, state)
		fmt.Println(res.Header.To.Name, tot.DataBytes, err)
	}
	eq, _, _ := blockdev.Equal(ctx, tue, restore)
	fmt.Println("restored equals tuesday:", eq)
	s.Close()

	// Inspection never writes: read-only views of both devices suffice.
	ro, err := snapshot.Open(blockdev.ReadOnly(origin), blockdev.ReadOnly(store), snapshot.Options{ReadOnly: true})
	if err != nil {
		panic(err)
	}
	defer ro.Close()
	fmt.Println(len(ro.List()), "volumes; problems:", len(ro.CheckReport().Problems))
	// Output:
	// monday 4096 <nil>
	// tuesday 4096 <nil>
	// restored equals tuesday: true
	// 3 volumes; problems: 0
}
