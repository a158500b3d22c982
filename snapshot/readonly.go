package snapshot

import (
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/journal"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// errReadOnlyStore is what every change to a store opened with
// Options.ReadOnly returns.
var errReadOnlyStore = fmt.Errorf("%w: the store is open read-only", ErrReadOnly)

// writable returns why the store cannot take a change, or nil: it is
// closed, failed, or open read-only.
func (s *Store) writable() error {
	if err := s.usable(); err != nil {
		return err
	}
	if s.opts.ReadOnly {
		return errReadOnlyStore
	}
	return nil
}

// closeReadOnly closes a read-only store: no goroutines ran, nothing is
// buffered or pending, so nothing is flushed or written. The metadata
// overlay is closed too: it pins every node the replay changed.
func (s *Store) closeReadOnly() error {
	s.cancel()
	err := s.j.Close()
	if errors.Is(err, journal.ErrClosed) {
		err = nil
	}
	if merr := s.m.Close(); err == nil && merr != nil && !errors.Is(merr, meta.ErrClosed) {
		err = merr
	}
	s.closeVolumes()
	return err
}

// closeVolumes makes every open volume handle of a closed store fail.
func (s *Store) closeVolumes() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.volumes {
		v.dead.Store(true)
	}
}
