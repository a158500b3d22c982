package snapshot

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// The owner record (identity.go has its layout).
//
// The flock that lockDevices takes is the first line: it refuses a second
// opener of a File or URing store device in any process. The owner record
// is the second, for every store device, the ones that cannot be locked
// too (a Slice, a CrashSim, a device of the caller's own): a read-write
// Open writes who holds the store (host, pid, a random open id, the time)
// before it writes anything else, and Close clears it. An Open that finds
// the record held decides whether the holder still runs:
//
//   - an open id of a Store open in this process: it runs (refuse);
//   - this host and this pid, but no such Store: that Store is gone (a
//     crash the process lived through: take over);
//   - the holder held the store device's flock and this Open got it: the
//     holder is gone, as the flock goes with its process (take over);
//   - this host and no process has the pid, or the record predates the
//     host's last boot (Linux): gone (take over);
//   - otherwise (another host, or a live pid on a device without flock)
//     it may run: refuse with an *OwnerError naming it, unless
//     Options.TakeOver says the caller knows it is gone.
//
// A read-only Open writes nothing and refuses nothing for the record: it
// opens beside a live holder as well (where the store device has a flock,
// that refuses it first), and Store.Owner reports the holder, so that a
// tool can say that what it shows may be changing.

// OwnerError is the refusal of an Open of a store that another Store
// holds, as its owner record says. It wraps ErrLocked.
type OwnerError struct {
	Host   string
	PID    int
	Since  time.Time
	OpenID string // hex
}

func (e *OwnerError) Error() string {
	return fmt.Sprintf("%v: the store is held by pid %d on host %q since %s (open id %s); if that process is gone, open with Options.TakeOver",
		ErrLocked, e.PID, e.Host, e.Since.UTC().Format(time.RFC3339), e.OpenID)
}

func (e *OwnerError) Unwrap() error { return ErrLocked }

// Owner describes the holder an owner record names.
type Owner struct {
	Host   string
	PID    int
	Since  time.Time
	OpenID string // hex
	// Flock: the holder has the store device's flock too.
	Flock bool
}

// Owner returns the owner record Open found: for a read-only Store, the
// read-write Store that held the store then, if any; for a read-write
// one, itself.
func (s *Store) Owner() (Owner, bool) {
	s.id.mu.Lock()
	defer s.id.mu.Unlock()
	o := s.ownerSeen
	if !s.opts.ReadOnly {
		o = s.id.st.owner
	}
	if !o.held() {
		return Owner{}, false
	}
	return o.public(), true
}

func (o *ownerRecord) public() Owner {
	return Owner{Host: o.host, PID: int(o.pid), Since: time.Unix(0, o.since), OpenID: fmt.Sprintf("%x", o.id), Flock: o.flock}
}

// liveOpens holds the open ids of the read-write Stores open in this
// process.
var liveOpens sync.Map // [16]byte -> struct{}

// judging serialises, within this process, the reading of an owner
// record with the claim that follows it (openIdentity; Format from its
// check to its claim), so that two Opens here of one device without
// flock cannot both find it free. Across processes the flock does that
// where there is one. Lock order: before the Store's id.mu; nothing else
// of a store is held with it.
var judging sync.Mutex

// thisHost is the host name owner records carry (at most maxHostLen
// bytes).
func thisHost() string {
	h, err := os.Hostname()
	if err != nil {
		return ""
	}
	return h[:min(len(h), maxHostLen)]
}

// newOwner is this process's owner record for a new open.
func newOwner(flock bool) ownerRecord {
	o := ownerRecord{pid: uint64(os.Getpid()), since: time.Now().UnixNano(), flock: flock, host: thisHost()}
	for o.id == [16]byte{} {
		_, _ = rand.Read(o.id[:])
	}
	return o
}

// ownerGone reports whether the holder o names has gone (see above).
// flock: this Open holds the store device's flock.
func ownerGone(o *ownerRecord, flock bool) bool {
	if _, live := liveOpens.Load(o.id); live {
		return false
	}
	sameHost := o.host == thisHost()
	switch {
	case sameHost && o.pid == uint64(os.Getpid()):
		return true
	case o.flock && flock:
		return true
	case sameHost && !pidAlive(int(o.pid)):
		return true
	case sameHost && openedBeforeBoot(o.since):
		return true // its pid, if alive, is another process's now
	}
	return false
}

// refuseOwner returns the *OwnerError that refuses an Open (or a Format
// over the store) with opts while o holds it, or nil.
func refuseOwner(o *ownerRecord, opts Options) error {
	if !o.held() || opts.TakeOver || ownerGone(o, opts.storeFlock) {
		return nil
	}
	return &OwnerError{Host: o.host, PID: int(o.pid), Since: time.Unix(0, o.since), OpenID: fmt.Sprintf("%x", o.id)}
}

// refuseFormatOver refuses a Format of a store device that holds a store
// another Store holds (its owner record says so): formatting it would
// pull the journal and the metadata from under that Store. Anything that
// is not such a store is formatted over.
func refuseFormatOver(store blockdev.Device, opts Options) error {
	buf := blockdev.AlignedBuffer(max(superblockSize, store.BlockSize()))
	if _, err := store.ReadAt(buf, 0); err != nil {
		return nil
	}
	g, err := decodeSuperblock(buf)
	if err != nil || g.idLen == 0 || g.idOff+g.idLen > store.Size() {
		return nil
	}
	st, err := readIdentity(store, &g)
	if err != nil {
		return nil
	}
	return refuseOwner(&st.owner, opts)
}

// openedBeforeBoot reports whether a record of this host dated since
// (unix ns) predates the host's last boot (a second of slack for the
// boot time's rounding).
func openedBeforeBoot(since int64) bool {
	boot, ok := bootTime()
	return ok && time.Unix(0, since).Before(boot.Add(-time.Second))
}

// claim makes this Store the store's owner, after the identity region's
// record has been judged (openIdentity): the record and any settled
// samples are written before the Open writes anything else.
func (s *Store) claimLocked(flock bool) error {
	s.id.st.owner = newOwner(flock)
	liveOpens.Store(s.id.st.owner.id, struct{}{}) // live from its first write on
	if err := s.writeIdentityLocked(); err != nil {
		liveOpens.Delete(s.id.st.owner.id)
		return err
	}
	s.claimed = true
	return nil
}

// releaseOwner clears the owner record at Close (or at a failed Open): the
// store is free for the next opener. Called when nothing else writes the
// store.
func (s *Store) releaseOwner() error {
	if !s.claimed {
		return nil
	}
	s.claimed = false
	s.id.mu.Lock()
	defer s.id.mu.Unlock()
	liveOpens.Delete(s.id.st.owner.id)
	s.id.st.owner = ownerRecord{}
	return s.writeIdentityLocked()
}

// storeFlockable reports whether the store device takes a real flock
// (lockDevices then holds it).
func storeFlockable(store blockdev.Device) bool {
	_, ok := store.(blockdev.Locker)
	return ok && !blockdev.IsReadOnly(store)
}

// formatIdentity writes a new store's identity region: its origin
// fingerprinted (flushed first, so that the hashes are of durable
// contents) and, with claim, this Store as the owner. A store without the
// region (transient) has nothing to write.
func (s *Store) formatIdentity(claim bool) error {
	if s.geo.idLen == 0 {
		return nil
	}
	if err := s.origin.Flush(); err != nil {
		return fmt.Errorf("snapshot: flush origin: %w", err)
	}
	if err := s.newIdentity(); err != nil {
		return err
	}
	s.id.mu.Lock()
	defer s.id.mu.Unlock()
	if claim {
		return s.claimLocked(s.opts.storeFlock)
	}
	return s.writeIdentityLocked()
}

// openIdentity reads the identity region at Open, checks the origin
// against the fingerprint, and judges the owner record: a read-only Open
// only notes it; a read-write one refuses a live holder, and otherwise
// hashes the samples a crash left dirty (their contents are now settled:
// the origin is flushed first) and claims the store. A store formatted
// before the region existed has no record and no fingerprint: the flock
// alone guards it.
func (s *Store) openIdentity() error {
	g := &s.geo
	if g.idLen == 0 {
		return nil
	}
	if !s.opts.ReadOnly {
		judging.Lock() // from the record's read to the claim
		defer judging.Unlock()
	}
	st, err := readIdentity(s.store, g)
	if errors.Is(err, ErrCorrupt) && s.opts.TakeOver {
		// Both copies are bad: TakeOver starts a new record, every sample
		// dirty, so that the origin as it is now is fingerprinted below.
		st = identState{uuid: g.uuid, originSize: g.originSize, n: sampleCount(g.originSize), sampleLen: sampleLen(g.originSize)}
		st.dirty = 1<<st.n - 1
		err = nil
	}
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			err = fmt.Errorf("%w (Options.TakeOver writes a new owner record and fingerprints the origin as it is)", err)
		}
		return err
	}
	if err := checkOrigin(s.origin, &st); err != nil {
		return err
	}
	id := &s.id
	id.pos, id.n = samplePositions(g.originSize)
	id.l = sampleLen(g.originSize)
	if st.n == 0 { // never fingerprinted: nothing to keep current
		id.n = 0
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	id.st = st
	id.durable.Store(st.dirty)
	if s.opts.ReadOnly {
		s.ownerSeen = st.owner
		return nil
	}
	if err := refuseOwner(&st.owner, s.opts); err != nil {
		return err
	}
	if st.dirty != 0 {
		if err := s.origin.Flush(); err != nil {
			return fmt.Errorf("snapshot: flush origin: %w", err)
		}
		h, err := hashSamples(s.origin, &id.pos, id.n, id.l)
		if err != nil {
			return err
		}
		id.st.hash, id.st.dirty = h, 0
		id.durable.Store(0)
	}
	return s.claimLocked(s.opts.storeFlock)
}
