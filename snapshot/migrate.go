package snapshot

import (
	"context"
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/internal/journalerr"
	"github.com/blocksnap/blocksnap/journal"
)

// Migrate converts a store of format version 1 (on old) into a store of
// the current format on dst, a different device: the same volumes,
// snapshots and clones, the same store identity, every data chunk copied
// to the same chunk number of dst's data region. old is only read (it may
// be a blockdev.ReadOnly view), so a failed or interrupted migration
// leaves it as it was: open it with an older build, or migrate again.
// dst's superblock is cleared first and written last, after everything
// else is flushed, so dst opens as a store only once the migration is
// whole. dst must be large enough for the journal, the metadata region
// and at least as many data chunks as old has. opts is Format's (the
// chunk size is old's); ChunkSize, Transient and ReadOnly are ignored.
// The devices are locked as Open locks them (old and origin shared, dst
// exclusively): ErrLocked while a Store has them.
func Migrate(origin, old, dst blockdev.Device, opts Options) error {
	g, err := readSuperblock(origin, old)
	if err != nil {
		return err
	}
	if g.version != oldSuperblockVersion {
		return fmt.Errorf("%w: the store is format version %d; Migrate converts version %d", ErrBadOptions, g.version, oldSuperblockVersion)
	}
	if dst.Size() <= 0 || old == dst {
		return fmt.Errorf("%w: Migrate writes a new store device", ErrBadOptions)
	}
	locks, err := lockDevices(origin, old, true) // shared: both are only read
	if err != nil {
		return err
	}
	defer locks.release()
	release, err := blockdev.LockDevice(dst, blockdev.LockExclusive)
	if err != nil {
		return fmt.Errorf("snapshot: new store device: %w", err)
	}
	defer func() { _ = release() }()
	zero := blockdev.AlignedBuffer(max(superblockSize, dst.BlockSize()))
	if _, err := dst.WriteAt(zero, 0); err != nil {
		return fmt.Errorf("snapshot: migrate: clear the new superblock: %w", err)
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("snapshot: migrate: %w", err)
	}
	opts.ChunkSize, opts.Transient, opts.ReadOnly = int64(g.chunkSize), false, false
	s, err := formatRegions(origin, dst, opts)
	if err != nil {
		return err
	}
	if err := s.migrateFrom(old, g); err != nil {
		s.abort()
		return err
	}
	return nil
}

// migrateFrom loads old's index and state into s (a formatted store, not
// started), copies the data chunks, commits and closes s, and writes its
// superblock.
func (s *Store) migrateFrom(old blockdev.Device, g geometry) error {
	if s.geo.dataChunks < g.dataChunks {
		return fmt.Errorf("%w: the new store holds %d data chunks, the old one %d", ErrBadOptions, s.geo.dataChunks, g.dataChunks)
	}
	s.geo.uuid, s.geo.formatted = g.uuid, g.formatted
	s.origVol.created = g.formatted
	jdev, err := blockdev.Slice(old, g.journalOff, g.journalLen)
	if err != nil {
		return fmt.Errorf("%w: old journal region: %v", ErrCorrupt, err)
	}
	s.migrating, s.replaying = true, true
	oj, err := journal.OpenReadOnly(jdev, journal.Options{CheckpointSize: g.journalLen / 4 / 4096 * 4096}, (*replayer)(s))
	s.migrating, s.replaying = false, false
	if errors.Is(err, journal.ErrCorrupt) {
		return journalerr.Wrap(ErrCorrupt, "old store", g.journalOff, g.journalLen, err)
	}
	if err != nil {
		return fmt.Errorf("snapshot: migrate: read the old store: %w", err)
	}
	_ = oj.Close()
	if err := s.copyData(old, g); err != nil {
		return err
	}
	if err := s.store.Flush(); err != nil {
		return fmt.Errorf("snapshot: migrate: %w", err)
	}
	if err := s.treeCommit(context.Background()); err != nil {
		return err
	}
	if err := s.j.Close(); err != nil {
		return fmt.Errorf("snapshot: migrate: %w", err)
	}
	s.j = nil
	if err := s.m.Close(); err != nil {
		return fmt.Errorf("snapshot: migrate: %w", err)
	}
	s.m = nil
	if err := s.formatIdentity(false); err != nil {
		return err
	}
	return writeSuperblock(s.store, &s.geo)
}

// copyData copies every data chunk the index references from old's data
// region to the same chunk of s's.
func (s *Store) copyData(old blockdev.Device, g geometry) error {
	buf := blockdev.AlignedBuffer(int(s.cs))
	var cerr error
	err := s.ix.ascend(entry{}, func(x entry) bool {
		if !x.isData() {
			return true
		}
		if _, cerr = old.ReadAt(buf, g.dataOff+int64(x.loc)*s.cs); cerr != nil {
			cerr = fmt.Errorf("snapshot: migrate: read old chunk %d: %w", x.loc, cerr)
			return false
		}
		if _, cerr = s.store.WriteAt(buf, s.storeOff(x.loc)); cerr != nil {
			cerr = fmt.Errorf("snapshot: migrate: write chunk %d: %w", x.loc, cerr)
			return false
		}
		return true
	})
	if err != nil {
		return metaErr("migrate: walk of the index", err)
	}
	return cerr
}

// MigrateSize returns the smallest size, in whole 4 KiB blocks, of a
// device Migrate can convert the version 1 store on old into with opts:
// room for the journal, the metadata region and old's data chunks.
func MigrateSize(origin, old blockdev.Device, opts Options) (int64, error) {
	g, err := readSuperblock(origin, old)
	if err != nil {
		return 0, err
	}
	if g.version != oldSuperblockVersion {
		return 0, fmt.Errorf("%w: the store is format version %d; Migrate converts version %d", ErrBadOptions, g.version, oldSuperblockVersion)
	}
	opts.ChunkSize, opts.Transient = int64(g.chunkSize), false
	if err := opts.normalize(); err != nil {
		return 0, err
	}
	for size := old.Size() / 4096 * 4096; ; size += max(size/64, 1<<20) / 4096 * 4096 {
		ng, err := layout(origin, sized{old, size}, &opts)
		if err == nil && ng.dataChunks >= g.dataChunks {
			return size, nil
		}
	}
}

// sized is a device seen with another size, for layout.
type sized struct {
	blockdev.Device
	n int64
}

func (d sized) Size() int64 { return d.n }
