package snapshot

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Import fills a blank volume from a device, under a name no user volume
// can have (importPrefix: ValidName refuses slashes), and renames it when
// the copy is complete and durable. So a crash mid-import leaves no volume
// of the wanted name, only an "import/NAME" one, which the next Open
// deletes (a read-only Open lists it, and leaves it). A failed or canceled
// Import deletes it itself.

// importPrefix starts the name of a volume being imported.
const importPrefix = "import/"

// ImportOptions configures Import.
type ImportOptions struct {
	// Progress, if set, is called as the copy goes: the bytes of the
	// source covered so far, and its size.
	Progress func(done, total int64)
}

// Import makes a new volume, named name, of src's size and contents, and
// returns it open. Only what src may hold is read (the holes it reports
// through blockdev.AllocationMapper are skipped), and chunks that read as
// zeros take no store space, so a sparse golden image costs only its data.
// src's size must be a multiple of the volume block size and at most
// MaxVolumeSize. It stops when ctx ends, and then, as on any failure,
// leaves no volume behind.
func (s *Store) Import(ctx context.Context, name string, src blockdev.Device, opts ImportOptions) (*Volume, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	s.mu.RLock()
	_, taken := s.byName[name]
	s.mu.RUnlock()
	if taken {
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	tmp := importPrefix + name
	vol, err := s.createVolume(tmp, src.Size())
	if errors.Is(err, ErrExists) {
		return nil, fmt.Errorf("%w: an import of %q is under way", ErrExists, name)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot: import %q: %w", name, err)
	}
	err = blockdev.Copy(ctx, vol, src, opts.Progress) // flushes the volume at its end
	if err == nil {
		err = s.Rename(tmp, name)
	}
	if err != nil {
		_ = vol.Close()
		if _, derr := s.Delete(tmp); derr != nil {
			err = errors.Join(err, fmt.Errorf("delete of the partial volume %q: %w", tmp, derr))
		}
		return nil, fmt.Errorf("snapshot: import %q: %w", name, err)
	}
	return vol, nil
}

// dropInterruptedImports deletes the volumes of imports a crash cut short.
// Called by Open once the store runs; a delete that fails leaves its
// volume listed under its "import/" name.
func (s *Store) dropInterruptedImports() {
	if s.opts.ReadOnly {
		return
	}
	var names []string
	s.mu.RLock()
	for n := range s.byName {
		if strings.HasPrefix(n, importPrefix) {
			names = append(names, n)
		}
	}
	s.mu.RUnlock()
	for _, n := range names {
		_, _ = s.Delete(n)
	}
}
