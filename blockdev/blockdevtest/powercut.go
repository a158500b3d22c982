package blockdevtest

import (
	"fmt"
	"sync"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// PowerCut cuts the power to several CrashSims at once (CrashAll) when the
// k-th device call of a chosen kind arrives, counted over all of them: the
// machine lost power just before that call, which then fails with
// ErrCrashed like every later one. It prints the cut it is armed for and,
// once it fired, the call it cut, so a failure names it. It is safe for
// concurrent use.
type PowerCut struct {
	policy Policy
	done   chan struct{} // closed when the power goes

	mu     sync.Mutex // guards the fields below; taken before any CrashSim's lock (CrashAll)
	op     Op
	k      int
	counts [numOps]int
	sims   []*CrashSim
	names  []string
	cut    *Call       // the call the cut came before; nil before it fired
	after  []*CrashSim // the images the cut left, in device order
}

// NewPowerCut returns a PowerCut that fires at the k-th call of kind op
// (OpAny: of any kind) with crash policy p. k < 1 never fires on its own
// (Arm or Cut later).
func NewPowerCut(op Op, k int, p Policy) *PowerCut {
	return &PowerCut{op: op, k: k, policy: p, done: make(chan struct{})}
}

// Device returns sim wrapped so that its calls count towards the cut, under
// name for messages. Add every device before the first call.
func (pc *PowerCut) Device(name string, sim *CrashSim) blockdev.Device {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.sims = append(pc.sims, sim)
	pc.names = append(pc.names, name)
	return &cutDevice{pc: pc, sim: sim, name: name}
}

// NewDevice is Device of a new zero-filled CrashSim; a bad geometry fails t.
func (pc *PowerCut) NewDevice(t testing.TB, name string, size int64, blockSize int) blockdev.Device {
	t.Helper()
	sim, err := NewCrashSim(size, blockSize)
	if err != nil {
		t.Fatalf("blockdevtest: power cut device %s: %v", name, err)
	}
	return pc.Device(name, sim)
}

// Arm re-arms the cut for the n-th call of kind op from now (n >= 1), for
// a cut inside a chosen operation: arm, then start it.
func (pc *PowerCut) Arm(op Op, n int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.op, pc.k = op, pc.counts[op]+n
}

// Calls returns how many calls of kind op the devices have seen.
func (pc *PowerCut) Calls(op Op) int {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.counts[op]
}

// Fired reports whether the power is off.
func (pc *PowerCut) Fired() bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.after != nil
}

// Cut cuts the power now unless it is off already, and returns the images
// the cut left (the devices' successors, in the order they were added).
func (pc *PowerCut) Cut() []*CrashSim {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.cutLocked()
	return pc.after
}

func (pc *PowerCut) cutLocked() {
	if pc.after != nil {
		return
	}
	after, err := CrashAll(pc.policy, pc.sims...)
	if err != nil {
		// Only a CrashSim crashed behind the PowerCut's back gets here:
		// a bug in the test, not in the code under test.
		panic(fmt.Sprintf("blockdevtest: %v: %v", pc, err))
	}
	pc.after = after
	close(pc.done)
}

// Done returns a channel closed when the power goes, for a workload that
// waits for either its end or the cut.
func (pc *PowerCut) Done() <-chan struct{} { return pc.done }

// Policy returns the crash policy the cut applies.
func (pc *PowerCut) Policy() Policy { return pc.policy }

// After returns the images the cut left, or nil before it fired.
func (pc *PowerCut) After() []*CrashSim {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.after
}

func (pc *PowerCut) String() string {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.cut != nil {
		return fmt.Sprintf("power cut before the %s, policy %v", pc.cut, pc.policy)
	}
	if pc.after != nil {
		return fmt.Sprintf("power cut between calls (after %d), policy %v", pc.counts[OpAny], pc.policy)
	}
	if pc.k < 1 {
		return fmt.Sprintf("power cut unarmed, policy %v", pc.policy)
	}
	return fmt.Sprintf("power cut armed for the %s %s, policy %v", ordinal(pc.k), pc.op, pc.policy)
}

// tick counts a call and cuts the power if it is the chosen one.
func (pc *PowerCut) tick(op Op, name string, off, n int64) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.counts[OpAny]++
	pc.counts[op]++
	if pc.after != nil || pc.k < 1 || (pc.op != OpAny && pc.op != op) || pc.counts[pc.op] != pc.k {
		return
	}
	pc.cut = &Call{Op: op, Off: off, Len: n, N: pc.counts[op], Total: pc.counts[OpAny], Device: name}
	pc.cutLocked()
}

// cutDevice is one CrashSim behind a PowerCut.
type cutDevice struct {
	pc   *PowerCut
	sim  *CrashSim
	name string
}

func (d *cutDevice) ReadAt(p []byte, off int64) (int, error) {
	d.pc.tick(OpRead, d.name, off, int64(len(p)))
	return d.sim.ReadAt(p, off)
}

func (d *cutDevice) WriteAt(p []byte, off int64) (int, error) {
	d.pc.tick(OpWrite, d.name, off, int64(len(p)))
	return d.sim.WriteAt(p, off)
}

func (d *cutDevice) Flush() error {
	d.pc.tick(OpFlush, d.name, 0, 0)
	return d.sim.Flush()
}

func (d *cutDevice) Discard(off, n int64) error {
	d.pc.tick(OpDiscard, d.name, off, n)
	return d.sim.Discard(off, n)
}

func (d *cutDevice) Size() int64    { return d.sim.Size() }
func (d *cutDevice) BlockSize() int { return d.sim.BlockSize() }
func (d *cutDevice) Close() error   { return d.sim.Close() }
