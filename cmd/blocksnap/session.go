package main

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// ErrStoreInUse is returned when another process (such as `blocksnap
// serve`) holds the store.
var ErrStoreInUse = errors.New("store is in use by another process")

// errInUse is what lockFile returns for a lock held elsewhere.
var errInUse = errors.New("in use by another process")

// storeFlags are the flags every store command takes.
type storeFlags struct {
	origin, store, control string
	takeOver               bool // snapshot.Options.TakeOver
}

func addStoreFlags(fs *pflag.FlagSet) *storeFlags {
	f := &storeFlags{}
	fs.StringVar(&f.origin, "origin", "", "origin `PATH` (file or block device holding the live volume; none for a pool of volumes only)")
	fs.StringVar(&f.store, "store", "", "store `PATH` (file or block device holding snapshots and metadata)")
	fs.StringVar(&f.control, "control", "", "control socket `PATH` of a running serve (default STORE.control)")
	fs.BoolVar(&f.takeOver, "take-over", false, "open the store although its owner record names a holder the flock cannot see "+
		"(another host sharing the device): only once that holder is known to be gone")
	required(fs, "store")
	return f
}

func (f *storeFlags) controlPath() string {
	if f.control != "" {
		return f.control
	}
	return f.store + ".control"
}

// inUseAdvice is what to do about a store a running serve holds, for a
// command that cannot go through its control socket.
const inUseAdvice = "stop it first (kill -TERM PID; it drains its NBD clients and exits)"

// session is a store opened by this process. The store and origin are
// locked by snapshot.Open itself (flock on the device files, released at
// Close): the CLI takes no lock of its own, so a program embedding the
// library and this command exclude each other the same way.
type session struct {
	st     *snapshot.Store
	origin *blockdev.File
	store  *blockdev.File
}

// openDevices opens origin and store, read-only for an inspecting command.
// No origin path (a store without an origin) gives a nil origin.
func openDevices(origin, store string, a access) (*blockdev.File, *blockdev.File, error) {
	opts := blockdev.FileOptions{ReadOnly: a == inspect}
	var o *blockdev.File
	if origin != "" {
		var err error
		o, err = blockdev.Open(origin, opts)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("origin %s does not exist", origin)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("origin: %w", err)
		}
	}
	s, err := blockdev.Open(store, opts)
	if err != nil {
		closeFile(o)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("store %s does not exist (create it with blocksnap format --size)", store)
		}
		return nil, nil, fmt.Errorf("store: %w", err)
	}
	return o, s, nil
}

// inUseErr turns the library's ErrLocked on the store into ErrStoreInUse,
// for the commands that then go through a running serve's control socket.
// An origin locked by something else (an apply-diff, a hydrate, another
// store) is an error of its own, naming the holder where the system says.
func inUseErr(f *storeFlags, err error) error {
	var le *blockdev.LockedError
	var oe *snapshot.OwnerError
	switch {
	case errors.As(err, &oe):
		return ownerHeld("store", f.store, oe)
	case !errors.As(err, &le):
		return err
	case le.Path == f.origin:
		return fmt.Errorf("origin %s is in use by another process (%s)", f.origin, heldBy(le))
	}
	return fmt.Errorf("%s: %w (%w)", f.store, ErrStoreInUse, err)
}

// access says whether a command changes the store.
type access int

const (
	readWrite access = iota
	// inspect: the command only reads (list, stat, diff, check, dump,
	// export-diff).
	inspect
)

// storeOptions are the options a command opens the store with: an
// inspecting command opens it read-only, so that it never changes what it
// inspects (no journal epoch, no tail cut, no background work).
func storeOptions(a access) snapshot.Options {
	return snapshot.Options{ReadOnly: a == inspect}
}

// openSession opens (and so locks) the store named by f. It returns
// ErrStoreInUse when another process holds the store or its origin.
func openSession(f *storeFlags, a access) (*session, error) {
	return openSessionWith(f, a, storeOptions(a))
}

// openSessionWith is openSession with the store options given.
func openSessionWith(f *storeFlags, a access, opts snapshot.Options) (*session, error) {
	opts.TakeOver = opts.TakeOver || f.takeOver
	o, s, err := openDevices(f.origin, f.store, a)
	if err != nil {
		return nil, err
	}
	st, err := snapshot.Open(device(o), s, opts)
	if err != nil {
		closeFile(o)
		s.Close()
		if errors.Is(err, snapshot.ErrCorrupt) {
			return nil, fmt.Errorf("%s is not a blocksnap store, or its metadata is damaged: %w", f.store, err)
		}
		return nil, inUseErr(f, err)
	}
	return &session{st: st, origin: o, store: s}, nil
}

// close commits and closes the store (which releases its locks), and
// flushes and closes the devices. It returns the first error.
func (s *session) close() error {
	err := s.st.Close()
	for _, d := range []*blockdev.File{s.origin, s.store} {
		if d == nil {
			continue // no origin
		}
		if ferr := d.Flush(); err == nil && !errors.Is(ferr, blockdev.ErrReadOnly) {
			err = ferr
		}
		if cerr := d.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

// heldBy names the processes holding a lock, or says how to find them.
func heldBy(le *blockdev.LockedError) string {
	if len(le.Holders) == 0 {
		return "find it with: fuser -v " + le.Path
	}
	pids := make([]string, len(le.Holders))
	for i, p := range le.Holders {
		pids[i] = fmt.Sprint(p)
	}
	return "held by pid " + strings.Join(pids, ", ")
}

// device is f as a Device: nil for no file (a nil *File in a Device is
// not a nil Device).
func device(f *blockdev.File) blockdev.Device {
	if f == nil {
		return nil
	}
	return f
}

// closeFile closes f if there is one.
func closeFile(f *blockdev.File) {
	if f != nil {
		f.Close()
	}
}
