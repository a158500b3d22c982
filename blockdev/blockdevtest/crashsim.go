package blockdevtest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ErrCrashed is returned by every call on a CrashSim after Crash: the power
// is off. It wraps blockdev.ErrIO so engines treat it as a device error.
var ErrCrashed = fmt.Errorf("blockdevtest: device crashed: %w", blockdev.ErrIO)

// SectorSize is the unit in which a crash may keep or lose parts of a write.
const SectorSize = 512

// Mode says what a simulated power cut does to writes not yet covered by a
// Flush.
type Mode int

const (
	// Drop loses every unflushed write.
	Drop Mode = iota
	// Keep keeps every unflushed write.
	Keep
	// KeepSome keeps each 512-byte sector of each unflushed write with
	// probability P, independently, applied in write order.
	KeepSome
	// Tear leaves each 512-byte sector of each unflushed write kept,
	// dropped, or overwritten with garbage, with equal probability.
	Tear
)

func (m Mode) String() string {
	switch m {
	case Drop:
		return "drop"
	case Keep:
		return "keep"
	case KeepSome:
		return "keep-some"
	case Tear:
		return "tear"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Policy is a crash policy: a Mode, its probability (KeepSome) and the seed
// that makes the outcome repeatable.
type Policy struct {
	Mode Mode
	P    float64
	Seed uint64
}

func (p Policy) String() string {
	if p.Mode == KeepSome {
		return fmt.Sprintf("%s(p=%.2f,seed=%d)", p.Mode, p.P, p.Seed)
	}
	return fmt.Sprintf("%s(seed=%d)", p.Mode, p.Seed)
}

// AllPolicies returns one policy of each mode (KeepSome at p=0.5), seeded
// from seed, for tests that cycle through them.
func AllPolicies(seed uint64) []Policy {
	return []Policy{
		{Mode: Drop, Seed: seed},
		{Mode: Keep, Seed: seed},
		{Mode: KeepSome, P: 0.5, Seed: seed},
		{Mode: Tear, Seed: seed},
	}
}

// pendingOp is a write or discard that completed but is not yet durable.
// data is nil for a discard.
type pendingOp struct {
	off  int64
	n    int64
	data []byte
}

// CrashSim is a Device that behaves like a disk with a volatile write cache:
// reads see every completed write; Flush makes them durable; Crash returns
// the image a power cut could leave, as a new CrashSim, according to a
// Policy. It is safe for concurrent use; I/O is serialised, which is fine
// for a test device.
type CrashSim struct {
	mu      sync.RWMutex
	durable *blockdev.Mem // what survives any crash
	current *blockdev.Mem // what reads see
	pending []pendingOp   // completed writes since the last Flush, in order
	crashed bool
	closed  bool
	// size and bs outlive the images, so Size and BlockSize keep working
	// after a crash.
	size int64
	bs   int
	// Call counters; atomic because reads run under the read lock.
	reads, writes, flushes, discards atomic.Int64
}

// SimStats counts a CrashSim's calls.
type SimStats struct {
	Reads, Writes, Flushes, Discards int64
}

// NewCrashSim returns a zero-filled CrashSim of size bytes.
func NewCrashSim(size int64, blockSize int) (*CrashSim, error) {
	m, err := blockdev.NewMem(size, blockSize)
	if err != nil {
		return nil, err
	}
	return newSimFrom(m), nil
}

// MustCrashSim is NewCrashSim for tests; it panics on a bad geometry.
func MustCrashSim(size int64, blockSize int) *CrashSim {
	s, err := NewCrashSim(size, blockSize)
	if err != nil {
		panic(err)
	}
	return s
}

func newSimFrom(durable *blockdev.Mem) *CrashSim {
	return &CrashSim{durable: durable, current: durable.Clone(), size: durable.Size(), bs: durable.BlockSize()}
}

func (s *CrashSim) state() error {
	if s.crashed {
		return ErrCrashed
	}
	if s.closed {
		return blockdev.ErrClosed
	}
	return nil
}

// ReadAt implements blockdev.Device.
func (s *CrashSim) ReadAt(p []byte, off int64) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.state(); err != nil {
		return 0, err
	}
	s.reads.Add(1)
	return s.current.ReadAt(p, off)
}

// WriteAt implements blockdev.Device.
func (s *CrashSim) WriteAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.state(); err != nil {
		return 0, err
	}
	if _, err := s.current.WriteAt(p, off); err != nil {
		return 0, err
	}
	s.writes.Add(1)
	s.pending = append(s.pending, pendingOp{off: off, n: int64(len(p)), data: append([]byte(nil), p...)})
	return len(p), nil
}

// Discard implements blockdev.Device.
func (s *CrashSim) Discard(off, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.state(); err != nil {
		return err
	}
	if err := s.current.Discard(off, n); err != nil {
		return err
	}
	s.discards.Add(1)
	s.pending = append(s.pending, pendingOp{off: off, n: n})
	return nil
}

// Flush implements blockdev.Device: every completed write becomes durable.
func (s *CrashSim) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.state(); err != nil {
		return err
	}
	for _, op := range s.pending {
		apply(s.durable, op)
	}
	s.pending = s.pending[:0]
	s.flushes.Add(1)
	return nil
}

func apply(m *blockdev.Mem, op pendingOp) {
	// The range was validated when the op was accepted.
	if op.data == nil {
		_ = m.Discard(op.off, op.n)
		return
	}
	_, _ = m.WriteAt(op.data, op.off)
}

// Size implements blockdev.Device.
func (s *CrashSim) Size() int64 { return s.size }

// BlockSize implements blockdev.Device.
func (s *CrashSim) BlockSize() int { return s.bs }

// Close implements blockdev.Device. A closed CrashSim can still Crash: a
// clean shutdown followed by power loss.
func (s *CrashSim) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.state(); err != nil {
		return err
	}
	s.closed = true
	return nil
}

// Stats returns the call counts so far.
func (s *CrashSim) Stats() SimStats {
	return SimStats{Reads: s.reads.Load(), Writes: s.writes.Load(), Flushes: s.flushes.Load(), Discards: s.discards.Load()}
}

// Pending returns the number of completed writes and discards not yet
// covered by a Flush.
func (s *CrashSim) Pending() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.pending)
}

// Crash cuts the power: from now on every call on s fails with ErrCrashed,
// and the returned CrashSim (open, with nothing pending) holds the image the
// policy leaves: the durable image plus the chosen parts of the unflushed
// writes. Crashing an already crashed device returns an error.
func (s *CrashSim) Crash(p Policy) (*CrashSim, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.crashLocked(p)
}

// MustCrash is Crash for tests that know s has not crashed yet.
func (s *CrashSim) MustCrash(p Policy) *CrashSim {
	c, err := s.Crash(p)
	if err != nil {
		panic(err)
	}
	return c
}

func (s *CrashSim) crashLocked(p Policy) (*CrashSim, error) {
	if s.crashed {
		return nil, errors.New("blockdevtest: crash of a crashed device")
	}
	s.crashed = true
	img := s.durable
	s.durable, s.current = nil, nil
	rng := rand.New(rand.NewPCG(p.Seed, 0x9e3779b97f4a7c15))
	for _, op := range s.pending {
		switch p.Mode {
		case Drop:
		case Keep:
			apply(img, op)
		case KeepSome, Tear:
			applySectors(img, op, p, rng)
		default:
			return nil, fmt.Errorf("blockdevtest: unknown crash mode %v", p.Mode)
		}
	}
	s.pending = nil
	return newSimFrom(img), nil
}

// applySectors applies op sector by sector as the policy decides.
func applySectors(img *blockdev.Mem, op pendingOp, p Policy, rng *rand.Rand) {
	var sector [SectorSize]byte
	for i := int64(0); i < op.n; i += SectorSize {
		var src []byte
		switch {
		case p.Mode == KeepSome:
			if rng.Float64() >= p.P {
				continue
			}
			src = sector[:]
			clear(src)
			if op.data != nil {
				src = op.data[i : i+SectorSize]
			}
		default: // Tear
			switch rng.IntN(3) {
			case 0:
				continue
			case 1:
				src = sector[:]
				clear(src)
				if op.data != nil {
					src = op.data[i : i+SectorSize]
				}
			case 2:
				for j := range sector {
					sector[j] = byte(rng.Uint32())
				}
				src = sector[:]
			}
		}
		writeSector(img, op.off+i, src)
	}
}

// writeSector writes one 512-byte sector into img, whose block size may be
// larger, by read-modify-write of the containing block.
func writeSector(img *blockdev.Mem, off int64, src []byte) {
	bs := int64(img.BlockSize())
	base := off - off%bs
	blk := make([]byte, bs)
	_, _ = img.ReadAt(blk, base)
	copy(blk[off-base:], src)
	_, _ = img.WriteAt(blk, base)
}

// CrashAll cuts the power to several devices at the same instant: it holds
// every device's lock while it crashes each, so no write lands on one after
// another has crashed. It returns the new devices in the same order.
func CrashAll(p Policy, sims ...*CrashSim) ([]*CrashSim, error) {
	for _, s := range sims {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	out := make([]*CrashSim, len(sims))
	for i, s := range sims {
		q := p
		q.Seed += uint64(i) * 0x2545F4914F6CDD1D
		c, err := s.crashLocked(q)
		if err != nil {
			return nil, err
		}
		out[i] = c
	}
	return out, nil
}

// Image returns a copy of what reads see now (including unflushed writes).
func (s *CrashSim) Image() ([]byte, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.state(); err != nil {
		return nil, err
	}
	b := make([]byte, s.current.Size())
	_, err := s.current.ReadAt(b, 0)
	return b, err
}
