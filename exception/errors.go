package exception

import (
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Sentinel errors. They are wrapped with context; test them with errors.Is.
var (
	// ErrInvalidSnapshot: the snapshot was invalidated (its COW device
	// filled up, a copy or metadata write failed, or its persistent header
	// says valid 0). Every access to it returns this error; the origin and
	// other snapshots keep working.
	ErrInvalidSnapshot = errors.New("exception: snapshot is invalid")
	// ErrOverflow: a writable snapshot created with Options.Overflow has no
	// COW space for a write that needs a new chunk. Reads, and writes to
	// chunks it already holds, still work (the kernel's "PO" mode).
	ErrOverflow = fmt.Errorf("exception: snapshot overflowed: %w", blockdev.ErrNoSpace)
	// ErrNoSpace: the COW device has no free chunk.
	ErrNoSpace = fmt.Errorf("exception: COW device is full: %w", blockdev.ErrNoSpace)
	// ErrMerging: the snapshot is being merged into its origin; its own
	// volume refuses I/O, and a second merge cannot start.
	ErrMerging = errors.New("exception: snapshot is merging")
	// ErrBadHeader: the persistent store's header is not usable (no header,
	// unknown version, a size that does not fit the device).
	ErrBadHeader = errors.New("exception: bad persistent store header")
	// ErrBadMagic: the COW device's first chunk does not start with "SnAp".
	ErrBadMagic = errors.New("exception: bad persistent store magic")
	// ErrChunkSize: a chunk size that is not a power of two, smaller than a
	// block of the devices involved, or larger than MaxChunkSize.
	ErrChunkSize = errors.New("exception: bad chunk size")
	// ErrCorrupt: the metadata areas of a persistent store are inconsistent
	// (an exception pointing outside the COW device, at metadata, or at a
	// chunk another exception uses).
	ErrCorrupt = errors.New("exception: corrupt persistent store")
)
