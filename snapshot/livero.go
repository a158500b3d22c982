package snapshot

import (
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// A read-only Open beside a live writer (docs/metadata.md section 19).
//
// Where the store device takes a lock (File, URing, Mem), a read-only Open
// takes it shared, and a writer holds it exclusively: the Open is refused
// with an error that wraps ErrLocked and ErrLiveWriter and says how to
// check a live store (through its writer). Where it takes none (a Slice,
// a device of the caller's own), the read-only Open reads the metadata
// tree's last commit, T, plus the journal records after it, while the
// writer goes on. The writer never overwrites what its last durable commit
// reaches, but from its second tree commit on it reuses pages that T
// reached; every metadata page is validated against the transaction its
// parent expects, so the read-only store meets such a page as a
// validation failure. Before it reports one (a lookup's error, Check's
// findings) it reads the metadata superblocks again: if a tree commit
// newer than T is there, the failure is the writer's doing, and the error
// is a *StoreChangedError (ErrStoreChanged), never ErrCorrupt. After Check
// or a volume read met it the store fails with it (every later call says
// so): reopen it to read the new state. (Other calls return it; pages that
// validate are still the old commit's, so what else they read is as of
// the Open.)
//
// What this does not catch: volume data is read where the read-only
// store's index says it is, as it is now. A writer's origin write after
// its copy-on-write, or a data chunk it freed and reused, is read as the
// writer left it, without an error. A read-only open of a live store is a
// look at metadata, not a stable image: for one, take a snapshot through
// the writer.

// ErrStoreChanged reports that a store opened with Options.ReadOnly beside
// a live writer found metadata the writer had replaced since the Open: the
// store is not corrupt, the view is stale. *StoreChangedError carries the
// transactions.
var ErrStoreChanged = errors.New("snapshot: the store changed under the read-only open")

// StoreChangedError is ErrStoreChanged with the metadata tree commit the
// read-only Open read (From) and the one the writer has committed since
// (To).
type StoreChangedError struct {
	From, To uint64
}

func (e *StoreChangedError) Error() string {
	return fmt.Sprintf("%v (transaction %d -> %d); reopen it", ErrStoreChanged, e.From, e.To)
}

func (e *StoreChangedError) Unwrap() error { return ErrStoreChanged }

// ErrLiveWriter reports a read-only Open refused because a writer holds
// the store device's lock. It comes wrapped with ErrLocked (and the
// device's *blockdev.LockedError).
var ErrLiveWriter = errors.New("snapshot: a writer holds the store")

// storeChanged converts the metadata layer's *meta.ChangedError, which
// only a read-only store gets, or returns nil.
func storeChanged(err error) error {
	var ch *meta.ChangedError
	if errors.As(err, &ch) {
		return &StoreChangedError{From: ch.From, To: ch.To}
	}
	return nil
}

// changedUnder returns a *StoreChangedError if the store is read-only and
// a writer has committed a newer metadata tree since its Open, else nil.
func (s *Store) changedUnder() error {
	if !s.opts.ReadOnly || s.m == nil {
		return nil
	}
	return storeChanged(s.m.Changed())
}

// liveWriterErr explains a read-only Open's refused shared lock on the
// store device: only an exclusive holder, a read-write Store, refuses it
// (another handle or process; a second lock through one handle says
// nothing of the holder's mode).
func liveWriterErr(err error) error {
	var le *blockdev.LockedError
	if !errors.As(err, &le) || le.ThisHandle {
		return err
	}
	return fmt.Errorf("%w (%w: check a live store through it, with Store.Check, or `blocksnap check` while `blocksnap serve` runs)", err, ErrLiveWriter)
}

// failIfChanged fails a read-only store with err when err says the store
// changed under it (a volume read met a page its writer reused), so that
// every later call says to reopen; err is returned as it is.
func (s *Store) failIfChanged(err error) error {
	if errors.Is(err, ErrStoreChanged) {
		_ = s.fail(err)
	}
	return err
}
