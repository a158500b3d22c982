package meta

import (
	"errors"
	"fmt"
)

// A read-only Meta (Options.ReadOnly, or OpenOverlay) beside a live writer.
//
// Nothing stops another process from opening the region for writing while
// a read-only Meta reads it, on devices that take no lock. The writer's
// commits never overwrite a page the last durable transaction reaches, but
// a page freed by commit T+1 (its tree no longer reaches it) may be
// reused from then on, and the read-only Meta, which reads transaction T,
// still reaches it. Every page is validated against the transaction its
// parent expects (openPage), so such a reused page never reads as data: it
// fails validation, which would be reported as corruption. So a read-only
// Meta that meets a page failing validation first reads both superblocks
// again: if a transaction newer than the one it opened at is committed,
// the failure is the writer's doing and the error is a *ChangedError
// (ErrChanged), not ErrCorrupt. If not, nothing reused the page since the
// open, and the corruption is real.

// ErrChanged reports that a read-only Meta met a page that failed
// validation after the region had committed past the transaction it
// opened at: a live writer reused the page. The region is not corrupt;
// reopen to read the new transaction. ChangedError carries the numbers.
var ErrChanged = errors.New("meta: the region changed under a read-only open")

// ChangedError is ErrChanged with the transaction the read-only Meta
// opened at and the one now committed.
type ChangedError struct {
	From, To uint64
}

func (e *ChangedError) Error() string {
	return fmt.Sprintf("meta: the region changed under a read-only open (transaction %d -> %d)", e.From, e.To)
}

func (e *ChangedError) Unwrap() error { return ErrChanged }

// readOnly reports whether m never writes its region (and so may read
// beside a writer).
func (m *Meta) readOnly() bool { return m.overlay || m.opts.ReadOnly }

// Changed reads both superblocks of a read-only Meta's region and returns
// a *ChangedError if a transaction newer than the one it opened at is
// committed, else nil (also for a Meta that writes: its own commits are
// not a change under it). A superblock that cannot be read or validated
// counts as no change: the caller's error stands.
func (m *Meta) Changed() error {
	if !m.readOnly() {
		return nil
	}
	p := make([]byte, PageSize)
	var newest uint64
	for slot := uint64(0); slot < 2; slot++ {
		if _, err := m.dev.ReadAt(p, int64(slot)*PageSize); err != nil {
			continue
		}
		if s, err := decodeSuper(p, slot); err == nil {
			newest = max(newest, s.tx)
		}
	}
	if newest > m.opened {
		return &ChangedError{From: m.opened, To: newest}
	}
	return nil
}

// changedOr returns err, or a *ChangedError in its place when err is a
// validation failure (ErrCorrupt) met by a read-only Meta whose region has
// committed past the transaction it opened at.
func (m *Meta) changedOr(err error) error {
	if err == nil || !m.readOnly() || !errors.Is(err, ErrCorrupt) {
		return err
	}
	if ch := m.Changed(); ch != nil {
		return ch
	}
	return err
}
