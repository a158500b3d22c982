package bench

import (
	"fmt"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/exception"
	"github.com/blocksnap/blocksnap/snapshot"
)

func init() {
	Engines = append(Engines, exceptionEngine, snapshotEngine)
}

// exceptionEngine is the dm-snapshot model: every snapshot a persistent
// (kernel-format) store on its own COW device, so a first write costs one
// copy per snapshot.
var exceptionEngine = Engine{Name: "exception", New: func(pool *Pool, size, chunk int64, snaps int) (*Setup, error) {
	dev, err := pool.Device("origin", size)
	if err != nil {
		return nil, err
	}
	if err := prefill(dev, size); err != nil {
		return nil, err
	}
	origin, err := exception.NewOrigin(dev, exception.OriginOptions{})
	if err != nil {
		return nil, err
	}
	s := &Setup{Origin: origin, close: []func() error{origin.Close}}
	// Room for a full copy of the origin plus the metadata areas (one
	// chunk per chunk/16 exceptions) and the header.
	cowSize := size + size/(chunk/16) + 16*chunk
	n := 0
	s.Snap = func() error {
		cow, err := pool.Device(fmt.Sprintf("cow%d", n), cowSize)
		if err != nil {
			return err
		}
		n++
		snap, err := origin.CreateSnapshot(cow, exception.Options{ChunkSize: chunk, Persistent: true})
		if err != nil {
			return err
		}
		if s.Snapshot == nil {
			s.Snapshot = snap
		}
		return nil
	}
	return s.takeSnapshots(snaps)
}}

// snapshotStoreSize is the shared store for an origin of size bytes: room
// for one copy of it, a clone's worth of writes, and the journal.
func snapshotStoreSize(size int64) int64 { return 3*size + 64<<20 }

// snapshotEngine is the shared store: every snapshot in one store and one
// index, so a first write costs one copy however many snapshots exist.
var snapshotEngine = Engine{Name: "snapshot", New: func(pool *Pool, size, chunk int64, snaps int) (*Setup, error) {
	store, origin, err := newSnapshotStore(pool, size, chunk)
	if err != nil {
		return nil, err
	}
	s := &Setup{Origin: origin, close: []func() error{store.Close}}
	n := 0
	s.Snap = func() error {
		v, err := store.CreateSnapshot(fmt.Sprintf("snap%d", n), origin)
		n++
		if err != nil {
			return err
		}
		if s.Snapshot == nil {
			s.Snapshot = v
		}
		return nil
	}
	return s.takeSnapshots(snaps)
}}

func newSnapshotStore(pool *Pool, size, chunk int64) (*snapshot.Store, *snapshot.Volume, error) {
	dev, err := pool.Device("origin", size)
	if err != nil {
		return nil, nil, err
	}
	if err := prefill(dev, size); err != nil {
		return nil, nil, err
	}
	storeDev, err := pool.Device("store", snapshotStoreSize(size))
	if err != nil {
		return nil, nil, err
	}
	store, err := snapshot.Format(dev, storeDev, snapshot.Options{ChunkSize: int64(chunk)})
	if err != nil {
		return nil, nil, err
	}
	return store, store.Origin(), nil
}

// CloneDepths are the depths BenchmarkCloneRead sweeps.
var CloneDepths = []int{1, 10, 100}

// CloneRead: random 4 KiB reads of a clone depth levels deep (a clone of a
// clone of ... of the origin) whose data was written only at the top of the
// chain, so every read resolves through every level: MB/s, iops, p50-ns,
// p99-ns.
func CloneRead(b *testing.B, env Env, depth int) {
	pool, err := NewPool(env)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	store, origin, err := newSnapshotStore(pool, RegionSize, ChunkSize)
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	var vol blockdev.Device = origin
	parent := origin
	for d := range depth {
		c, err := store.CreateClone(fmt.Sprintf("clone%d", d), parent)
		if err != nil {
			b.Fatal(err)
		}
		parent = c
		vol = c
	}
	randomIO(b, Writers, RegionSize/BlockSize, 11, func(buf []byte, blk int64) error {
		_, err := vol.ReadAt(buf, blk*BlockSize)
		return err
	})
}
