// Package lockstat is a sync.RWMutex that measures itself: the longest
// exclusive hold, the longest span during which it was held shared (what a
// writer waiting for the exclusive lock waits for), and the longest wait
// to take it, each with the function that ended it. The store uses it for
// Store.mu and the metadata layer for Meta.mu, so that a writer's stall can
// be told apart into "waited for a lock someone held" and "the machine did
// not run it" (benchmarks report both).
//
// The cost is what a lock on the I/O path can carry: an uncontended Lock or
// RLock takes the mutex with a Try call and reads the clock once; a
// contended one reads it twice more. RLockShort, for a hot path's shared
// hold that does no I/O, reads the clock only when it has to wait. No call
// allocates. The functions that set a new maximum are recorded under a
// small mutex of their own, taken only then (rare once the maxima settle).
package lockstat

import (
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// base is the zero of the monotonic clock the spans are read from.
var base = time.Now()

// methods prefixes the names of RWMutex's methods, which note passes over
// to find the lock's user.
var methods = func() string {
	pc, _, _, _ := runtime.Caller(0)
	name := runtime.FuncForPC(pc).Name() // .../lockstat.init.func1
	return name[:strings.LastIndex(name, "lockstat.")+len("lockstat.")] + "(*RWMutex)."
}()

func now() int64 { return int64(time.Since(base)) }

// RWMutex is a sync.RWMutex with hold and wait statistics. The zero value
// is an unlocked mutex.
type RWMutex struct {
	mu sync.RWMutex
	// since is when the exclusive holder took the lock (written by it).
	since atomic.Int64
	// readers counts the shared holders; rsince is when the count last
	// went from 0 to 1. Two readers that cross 0 at the same moment can
	// make a span read short, never long: good enough for a maximum.
	readers atomic.Int32
	rsince  atomic.Int64
	// waiting counts the goroutines blocked taking the lock, either way
	// (UnlockYield reads it).
	waiting atomic.Int32

	maxHold, maxShared, maxWait atomic.Int64
	// recMu guards the functions recorded with each maximum. It is a
	// leaf: taken with mu held or not, and nothing is taken under it.
	recMu                  sync.Mutex
	holdBy, sharedBy, wait uintptr
}

// Stats are a mutex's maxima since the last Reset, in nanoseconds, with the
// function that released the lock after the longest hold or span, and the
// one that waited longest.
type Stats struct {
	MaxHold, MaxShared, MaxWait time.Duration
	HoldBy, SharedBy, WaitBy    string
}

// Lock takes the mutex exclusively.
func (l *RWMutex) Lock() {
	if !l.mu.TryLock() {
		t0 := now()
		l.waiting.Add(1)
		l.mu.Lock()
		l.waiting.Add(-1)
		t1 := now()
		l.note(&l.maxWait, &l.wait, t1-t0)
		l.since.Store(t1)
		return
	}
	l.since.Store(now())
}

// Unlock releases an exclusive hold.
func (l *RWMutex) Unlock() {
	l.note(&l.maxHold, &l.holdBy, now()-l.since.Load())
	l.mu.Unlock()
}

// UnlockYield is Unlock for a goroutine that is not the writer a stall
// is measured on (a tree commit, an admin call): if a goroutine was
// blocked taking the lock, it then yields its processor. Go's scheduler
// runs a goroutine that an unlock wakes next on the unlocker's processor,
// but only once the unlocker blocks, yields or has run out its 10 ms time
// slice (a system call does not count until the runtime's monitor takes
// the processor back, which can also take up to 10 ms); a writer woken so
// by a goroutine that carries on encoding or writing pages waited that
// long on a two-processor machine. The writer's own paths use Unlock: a
// yield there would queue the writer behind the goroutine it woke.
func (l *RWMutex) UnlockYield() {
	l.note(&l.maxHold, &l.holdBy, now()-l.since.Load())
	w := l.waiting.Load() > 0
	l.mu.Unlock()
	if w {
		runtime.Gosched()
	}
}

// RLock takes the mutex shared.
func (l *RWMutex) RLock() {
	if !l.mu.TryRLock() {
		l.rlockWait()
	}
	if l.readers.Add(1) == 1 {
		l.rsince.Store(now())
	}
}

// RUnlock releases a shared hold.
func (l *RWMutex) RUnlock() {
	if l.readers.Add(-1) == 0 {
		l.note(&l.maxShared, &l.sharedBy, now()-l.rsince.Load())
	}
	l.mu.RUnlock()
}

// RLockShort takes the mutex shared for a hold that is not timed, for a
// hot path whose hold is a lookup in memory: no I/O and no waiting inside
// it. A timed shared hold costs two clock reads and two adds on a counter
// every reader shares; on the store's read path that was about a tenth of
// a 4 KiB read from the page cache, more than the hold itself. The wait
// to take the lock is measured as RLock's is. Spans during which only
// short holders held the lock are not in MaxShared: they are as long as a
// lookup, unless the holder's thread was descheduled, which a scheduling
// latency measure shows better. Release with RUnlockShort.
func (l *RWMutex) RLockShort() {
	if !l.mu.TryRLock() {
		l.rlockWait()
	}
}

// rlockWait takes mu shared after a failed TryRLock, timing the wait.
func (l *RWMutex) rlockWait() {
	t0 := now()
	l.waiting.Add(1)
	l.mu.RLock()
	l.waiting.Add(-1)
	l.note(&l.maxWait, &l.wait, now()-t0)
}

// RUnlockShort releases a hold taken with RLockShort.
func (l *RWMutex) RUnlockShort() { l.mu.RUnlock() }

// TryLock takes the mutex exclusively if it is free.
func (l *RWMutex) TryLock() bool {
	if !l.mu.TryLock() {
		return false
	}
	l.since.Store(now())
	return true
}

// note raises max to d, recording the caller outside this package and
// sync (a sync.Cond's Wait unlocks on its caller's behalf).
func (l *RWMutex) note(max *atomic.Int64, by *uintptr, d int64) {
	if d <= max.Load() {
		return
	}
	var pcs [8]uintptr
	n := runtime.Callers(2, pcs[:])
	frames := runtime.CallersFrames(pcs[:n])
	var pc uintptr
	for {
		f, more := frames.Next()
		if !strings.HasPrefix(f.Function, "sync.") && !strings.HasPrefix(f.Function, methods) {
			pc = f.PC
			break
		}
		if !more {
			break
		}
	}
	l.recMu.Lock()
	if d > max.Load() {
		max.Store(d)
		*by = pc
	}
	l.recMu.Unlock()
}

// Stats returns the maxima since the last Reset.
func (l *RWMutex) Stats() Stats {
	l.recMu.Lock()
	defer l.recMu.Unlock()
	return Stats{
		MaxHold: time.Duration(l.maxHold.Load()), MaxShared: time.Duration(l.maxShared.Load()),
		MaxWait: time.Duration(l.maxWait.Load()),
		HoldBy:  funcName(l.holdBy), SharedBy: funcName(l.sharedBy), WaitBy: funcName(l.wait),
	}
}

// Reset clears the maxima.
func (l *RWMutex) Reset() {
	l.recMu.Lock()
	defer l.recMu.Unlock()
	l.maxHold.Store(0)
	l.maxShared.Store(0)
	l.maxWait.Store(0)
	l.holdBy, l.sharedBy, l.wait = 0, 0, 0
}

func funcName(pc uintptr) string {
	if pc == 0 {
		return ""
	}
	f := runtime.FuncForPC(pc)
	if f == nil {
		return ""
	}
	name := f.Name()
	if i := strings.LastIndex(name, "/"); i >= 0 {
		name = name[i+1:]
	}
	return name
}

// Max is a maximum kept with one atomic: for durations or counts measured
// outside a lock (a page read, a change's misses).
type Max struct{ v atomic.Int64 }

// Note raises the maximum to v.
func (x *Max) Note(v int64) {
	for {
		old := x.v.Load()
		if v <= old || x.v.CompareAndSwap(old, v) {
			return
		}
	}
}

// Load returns the maximum.
func (x *Max) Load() int64 { return x.v.Load() }

// Reset clears it.
func (x *Max) Reset() { x.v.Store(0) }
