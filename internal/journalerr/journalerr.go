// Package journalerr restates a journal ErrCorrupt for the engine that holds
// the journal in a slice of one of its devices.
package journalerr

import (
	"fmt"
	"regexp"
	"strconv"
)

// journalAt matches the journal's device-relative locations in its
// ErrCorrupt messages: "superblock at N", "checkpoint at N".
var journalAt = regexp.MustCompile(`\b(superblock|checkpoint) at (\d+)`)

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
// [base, base+length) of the device named dev, in sentinel. Offsets the
// journal reports relative to its region are restated relative to dev.
func Wrap(sentinel error, dev string, base, length int64, err error) error {
	msg := journalAt.ReplaceAllStringFunc(err.Error(), func(m string) string {
		sub := journalAt.FindStringSubmatch(m)
		n, perr := strconv.ParseInt(sub[2], 10, 64)
		if perr != nil {
			return m
		}
		return fmt.Sprintf("%s at %s byte %d (journal byte %d)", sub[1], dev, base+n, n)
	})
	return &corruptJournalError{sentinel: sentinel, err: err,
		msg: fmt.Sprintf("%v: journal in %s bytes [%d, %d): %s", sentinel, dev, base, base+length, msg)}
}
