package blockdevtest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Op is a kind of device call, for fault injection and power cuts.
type Op int

const (
	// OpAny matches every kind of call (counting them all together).
	OpAny Op = iota
	OpRead
	OpWrite
	OpFlush
	OpDiscard
	numOps
)

func (o Op) String() string {
	if o < 0 || o >= numOps {
		return fmt.Sprintf("op(%d)", int(o))
	}
	return [...]string{"call", "read", "write", "flush", "discard"}[o]
}

// Call describes one device call seen by Faulty or PowerCut.
type Call struct {
	Op  Op
	Off int64
	Len int64
	// N is the 1-based index of this call among calls of its kind; Total
	// among all calls.
	N, Total int
	// Device names the device the call was made on (Faulty's or
	// PowerCut's name for it), for messages.
	Device string
}

// Index returns c's 1-based index among calls of kind op (Total for OpAny).
func (c Call) Index(op Op) int {
	if op == OpAny {
		return c.Total
	}
	return c.N
}

func (c Call) String() string {
	s := fmt.Sprintf("%s %s (call %d)", ordinal(c.N), c.Op, c.Total)
	if c.Op != OpFlush {
		s += fmt.Sprintf(" at %d+%d", c.Off, c.Len)
	}
	if c.Device != "" {
		s += " on " + c.Device
	}
	return s
}

func ordinal(n int) string {
	suffix := "th"
	switch {
	case n%100 >= 11 && n%100 <= 13:
	case n%10 == 1:
		suffix = "st"
	case n%10 == 2:
		suffix = "nd"
	case n%10 == 3:
		suffix = "rd"
	}
	return fmt.Sprintf("%d%s", n, suffix)
}

// Predicate chooses device calls. Predicates are small values that print
// what they choose ("the 7th flush"), so that a failing test names the
// fault it injected, and compose with And and Or. Match is called under
// Faulty's lock, one call at a time, in call order.
type Predicate interface {
	Match(c Call) bool
	String() string
}

type nth struct {
	op   Op
	k    int
	from bool
}

// Nth chooses the k-th call (1-based) of kind op: "the 7th flush".
func Nth(op Op, k int) Predicate { return nth{op: op, k: k} }

// FromNth chooses every call of kind op from the k-th on: a device that
// died.
func FromNth(op Op, k int) Predicate { return nth{op: op, k: k, from: true} }

func (p nth) Match(c Call) bool {
	if p.op != OpAny && p.op != c.Op {
		return false
	}
	i := c.Index(p.op)
	return i == p.k || p.from && i > p.k
}

func (p nth) String() string {
	if p.from {
		return fmt.Sprintf("every %s from the %s on", p.op, ordinal(p.k))
	}
	return fmt.Sprintf("the %s %s", ordinal(p.k), p.op)
}

type kind Op

// Kind chooses every call of kind op.
func Kind(op Op) Predicate { return kind(op) }

func (p kind) Match(c Call) bool { return Op(p) == OpAny || Op(p) == c.Op }
func (p kind) String() string    { return "every " + Op(p).String() }

type touching struct{ off, n int64 }

// Touching chooses reads, writes and discards that overlap [off, off+n).
func Touching(off, n int64) Predicate { return touching{off, n} }

func (p touching) Match(c Call) bool {
	return c.Op != OpFlush && c.Off < p.off+p.n && p.off < c.Off+c.Len
}

func (p touching) String() string { return fmt.Sprintf("touching [%d, %d)", p.off, p.off+p.n) }

type randomly struct {
	p    float64
	seed uint64
	rng  *rand.Rand
}

// Randomly chooses each call with probability p, repeatably for a seed.
func Randomly(p float64, seed uint64) Predicate {
	return &randomly{p: p, seed: seed, rng: rand.New(rand.NewPCG(seed, 0x5eed))}
}

func (p *randomly) Match(Call) bool { return p.rng.Float64() < p.p }
func (p *randomly) String() string {
	return fmt.Sprintf("with probability %.2f (seed %d)", p.p, p.seed)
}

type and []Predicate

// And chooses the calls every one of ps chooses. Every predicate sees every
// call, so a stateful one (Randomly) stays repeatable.
func And(ps ...Predicate) Predicate { return and(ps) }

func (ps and) Match(c Call) bool {
	ok := true
	for _, p := range ps {
		ok = p.Match(c) && ok
	}
	return ok
}

func (ps and) String() string { return joinPredicates(ps, " and ") }

type or []Predicate

// Or chooses the calls any one of ps chooses.
func Or(ps ...Predicate) Predicate { return or(ps) }

func (ps or) Match(c Call) bool {
	ok := false
	for _, p := range ps {
		ok = p.Match(c) || ok
	}
	return ok
}

func (ps or) String() string { return "(" + joinPredicates(ps, " or ") + ")" }

func joinPredicates(ps []Predicate, sep string) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, sep)
}

type funcPredicate struct {
	desc  string
	match func(Call) bool
}

// Func chooses the calls match chooses; desc says which, for messages.
func Func(desc string, match func(Call) bool) Predicate { return funcPredicate{desc, match} }

func (p funcPredicate) Match(c Call) bool { return p.match(c) }
func (p funcPredicate) String() string    { return p.desc }

// Injector is one fault: the calls a Predicate chooses fail with Err.
type Injector struct {
	When Predicate
	Err  error
}

// Fail returns the injector that fails the calls p chooses with err.
func Fail(p Predicate, err error) Injector { return Injector{When: p, Err: err} }

func (in Injector) String() string { return fmt.Sprintf("fail %s with %q", in.When, in.Err) }

// ErrInjected is the error Faulty's injected faults wrap, besides the
// injector's own error, so tests can tell an injected fault from a real one.
var ErrInjected = errors.New("blockdevtest: injected fault")

// Faulty wraps a Device and fails chosen calls with chosen errors, for error
// sweeps: fail the k-th call for every k until a run completes with no fault.
// A failed write or discard does nothing (the device is not touched). It is
// safe for concurrent use.
type Faulty struct {
	dev  blockdev.Device
	name string

	mu       sync.Mutex // guards the fields below; no other lock is taken under it but the predicates' own
	counts   [numOps]int
	rules    []Injector
	callback []func(Call) error
	injected []string
}

// NewFaulty wraps dev. With no rules it passes every call through.
func NewFaulty(dev blockdev.Device) *Faulty { return &Faulty{dev: dev} }

// NewNamedFaulty wraps dev under a name that fault messages use ("the 7th
// flush on store").
func NewNamedFaulty(dev blockdev.Device, name string) *Faulty {
	return &Faulty{dev: dev, name: name}
}

// Inject adds fault injectors; the first that chooses a call fails it.
func (f *Faulty) Inject(ins ...Injector) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, ins...)
}

// FailNth makes the k-th call (1-based) of kind op fail with err.
func (f *Faulty) FailNth(op Op, k int, err error) { f.Inject(Fail(Nth(op, k), err)) }

// FailFrom makes every call of kind op from the k-th on fail with err: a
// device that died.
func (f *Faulty) FailFrom(op Op, k int, err error) { f.Inject(Fail(FromNth(op, k), err)) }

// FailWhen fails every call for which match returns a non-nil error, with
// that error. It also serves as a hook that sees every call in order (one
// that returns nil fails nothing).
func (f *Faulty) FailWhen(match func(Call) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.callback = append(f.callback, match)
}

// Clear removes every rule; counts are kept.
func (f *Faulty) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules, f.callback = nil, nil
}

// Calls returns the number of calls seen so far (Close not included).
func (f *Faulty) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[OpAny]
}

// Count returns the number of calls of kind op seen so far.
func (f *Faulty) Count(op Op) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[op]
}

// Injected returns the number of calls that were failed.
func (f *Faulty) Injected() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.injected)
}

// Faults returns, in order, a description of each call that was failed and
// why: "2nd flush (call 9) on store: fail the 2nd flush with ...".
func (f *Faulty) Faults() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.injected...)
}

func (f *Faulty) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := make([]string, len(f.rules))
	for i, r := range f.rules {
		s[i] = r.String()
	}
	name := f.name
	if name == "" {
		name = "device"
	}
	return fmt.Sprintf("%s: %s", name, strings.Join(s, "; "))
}

// Unwrap returns the wrapped device.
func (f *Faulty) Unwrap() blockdev.Device { return f.dev }

// fault counts the call and returns the error to fail it with, or nil.
func (f *Faulty) fault(op Op, off, n int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.counts[OpAny]++
	f.counts[op]++
	c := Call{Op: op, Off: off, Len: n, N: f.counts[op], Total: f.counts[OpAny], Device: f.name}
	for _, r := range f.rules {
		if r.When.Match(c) {
			f.injected = append(f.injected, c.String()+": "+r.String())
			return fmt.Errorf("%w: %s: %w", ErrInjected, c, r.Err)
		}
	}
	for _, match := range f.callback {
		if err := match(c); err != nil {
			f.injected = append(f.injected, c.String()+": "+err.Error())
			return fmt.Errorf("%w: %s: %w", ErrInjected, c, err)
		}
	}
	return nil
}

// ReadAt implements blockdev.Device.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.dev.ReadAt(p, off)
}

// WriteAt implements blockdev.Device.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.dev.WriteAt(p, off)
}

// Flush implements blockdev.Device.
func (f *Faulty) Flush() error {
	if err := f.fault(OpFlush, 0, 0); err != nil {
		return err
	}
	return f.dev.Flush()
}

// Discard implements blockdev.Device.
func (f *Faulty) Discard(off, n int64) error {
	if err := f.fault(OpDiscard, off, n); err != nil {
		return err
	}
	return f.dev.Discard(off, n)
}

// Size implements blockdev.Device.
func (f *Faulty) Size() int64 { return f.dev.Size() }

// BlockSize implements blockdev.Device.
func (f *Faulty) BlockSize() int { return f.dev.BlockSize() }

// Close implements blockdev.Device; it is never failed.
func (f *Faulty) Close() error { return f.dev.Close() }
