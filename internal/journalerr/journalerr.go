// Package journalerr restates a journal ErrCorrupt for the engine that holds
// the journal in a slice of one of its devices.
package journalerr

import (
	"errors"
	"fmt"
	"strings"

	"github.com/blocksnap/blocksnap/journal"
)

// corruptJournalError is a journal ErrCorrupt seen by an engine: it
// satisfies errors.Is for both the engine's sentinel and the journal's, and
// its message names byte offsets on the device that holds the journal.
type corruptJournalError struct {
	sentinel, err error
	msg           string
}

func (e *corruptJournalError) Error() string   { return e.msg }
func (e *corruptJournalError) Unwrap() []error { return []error{e.sentinel, e.err} }

// Wrap wraps err, a journal.ErrCorrupt from the journal held in
// [base, base+length) of the device named dev, in sentinel. Every
// *journal.CorruptAtError in err's tree (one per damaged superblock copy or
// checkpoint) is restated with its offset on dev.
func Wrap(sentinel error, dev string, base, length int64, err error) error {
	msg := err.Error()
	for _, at := range locations(err) {
		journalAt := fmt.Sprintf("%s at %d:", at.What, at.Off)
		devAt := fmt.Sprintf("%s at %s byte %d (journal byte %d):", at.What, dev, base+at.Off, at.Off)
		msg = strings.Replace(msg, journalAt, devAt, 1)
	}
	return &corruptJournalError{sentinel: sentinel, err: err,
		msg: fmt.Sprintf("%v: journal in %s bytes [%d, %d): %s", sentinel, dev, base, base+length, msg)}
}

// locations returns the *journal.CorruptAtError values in err's tree, in
// the order its message prints them.
func locations(err error) []*journal.CorruptAtError {
	var out []*journal.CorruptAtError
	var walk func(error)
	walk = func(e error) {
		if at, ok := e.(*journal.CorruptAtError); ok {
			out = append(out, at)
			return
		}
		switch u := e.(type) {
		case interface{ Unwrap() []error }:
			for _, c := range u.Unwrap() {
				walk(c)
			}
		case interface{ Unwrap() error }:
			if c := u.Unwrap(); c != nil {
				walk(c)
			}
		}
	}
	if err != nil && errors.Is(err, journal.ErrCorrupt) {
		walk(err)
	}
	return out
}
