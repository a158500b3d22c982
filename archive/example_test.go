package archive_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/blocksnap/blocksnap/archive"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// A full and an incremental backup of snapshots to a directory repository,
// a restore, and a lazy open of the backup as a read-only device. For S3,
// use archive.NewS3 (or archive.NewBackend with an s3:// URL) instead.
func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "archive-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	be, err := archive.NewDir(dir)
	if err != nil {
		log.Fatal(err)
	}
	repo, err := archive.Create(ctx, be, archive.Options{Passphrase: []byte("secret")})
	if err != nil {
		log.Fatal(err)
	}
	defer repo.Close()

	origin, _ := blockdev.NewMem(16<<20, 4096)
	storeDev, _ := blockdev.NewMem(32<<20, 4096)
	st, err := snapshot.Format(origin, storeDev, snapshot.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	live := st.Origin()
	defer live.Close()

	live.WriteAt([]byte("hello, monday"+string(make([]byte, 4096-13))), 0)
	mon, _ := st.CreateSnapshot("mon", live)
	full, err := repo.BackupSnapshot(ctx, st, mon, nil, archive.BackupOptions{Volume: "vm1"})
	if err != nil {
		log.Fatal(err)
	}
	live.WriteAt([]byte("hello, tuesday"+string(make([]byte, 4096-14))), 8<<20)
	tue, _ := st.CreateSnapshot("tue", live)
	inc, err := repo.BackupSnapshot(ctx, st, tue, mon, archive.BackupOptions{Volume: "vm1"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("full: of %d blocks, %d sent, %d zero\n", full.Progress.Blocks, full.Progress.Uploaded, full.Progress.Zero)
	fmt.Printf("incremental: read %d KiB, %d sent\n", inc.Progress.TotalBytes>>10, inc.Progress.Uploaded)

	target, _ := blockdev.NewMem(16<<20, 4096)
	if _, err := repo.Restore(ctx, inc.Manifest.ID, target, archive.RestoreOptions{}); err != nil {
		log.Fatal(err)
	}
	img, err := archive.Open(ctx, repo, inc.Manifest.ID, "")
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	a, b := make([]byte, 4096), make([]byte, 4096)
	target.ReadAt(a, 8<<20)
	img.ReadAt(b, 8<<20)
	fmt.Printf("restored: %s; lazily: %s\n", a[:14], b[:14])
	// Output:
	// full: of 256 blocks, 1 sent, 255 zero
	// incremental: read 64 KiB, 1 sent
	// restored: hello, tuesday; lazily: hello, tuesday
}
