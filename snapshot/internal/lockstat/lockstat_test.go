package lockstat

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A hold, a shared span and a wait are each at least as long as what the
// test made them (lower bounds only: a loaded machine only lengthens
// them), and are attributed to the function that ended them.
func TestStatsRecordHoldsAndWaits(t *testing.T) {
	var l RWMutex
	const d = 20 * time.Millisecond
	holdExclusive(&l, d)
	st := l.Stats()
	require.GreaterOrEqual(t, st.MaxHold, d)
	require.Contains(t, st.HoldBy, "holdExclusive")
	require.Zero(t, st.MaxShared)

	l.RLock()
	time.Sleep(d)
	l.RUnlock()
	st = l.Stats()
	require.GreaterOrEqual(t, st.MaxShared, d)
	require.Contains(t, st.SharedBy, "TestStatsRecordHoldsAndWaits")

	l.Reset()
	require.Equal(t, Stats{}, l.Stats())

	// A writer that waits for a reader's span.
	l.RLock()
	var wg sync.WaitGroup
	locked := make(chan struct{})
	wrote := false
	wg.Add(1)
	go func() {
		defer wg.Done()
		close(locked)
		l.Lock()
		wrote = true
		l.Unlock()
	}()
	<-locked
	time.Sleep(d)
	l.RUnlock()
	wg.Wait()
	require.True(t, wrote)
	st = l.Stats()
	require.GreaterOrEqual(t, st.MaxShared, d)
	// The writer may not have reached Lock before the sleep ended on a
	// loaded machine, so its wait has no lower bound; it is attributed
	// when there is one.
	if st.MaxWait > 0 {
		require.Contains(t, st.WaitBy, "TestStatsRecordHoldsAndWaits")
	}
}

func holdExclusive(l *RWMutex, d time.Duration) {
	l.Lock()
	defer l.Unlock()
	time.Sleep(d)
}

// A sync.Cond's Wait unlocks on its caller's behalf: the hold is its
// caller's.
func TestStatsThroughCond(t *testing.T) {
	var l RWMutex
	c := sync.NewCond(&l)
	done := false
	go func() {
		l.Lock()
		done = true
		c.Broadcast()
		l.Unlock()
	}()
	l.Lock()
	for !done {
		c.Wait()
	}
	l.Unlock()
	require.NotContains(t, l.Stats().HoldBy, "sync.")
}

// A short shared hold excludes a writer like any shared hold, but it is not
// timed: the span of a timed hold beside it is still reported, its own is
// not.
func TestCloneReadShortHoldsNotTimed(t *testing.T) {
	var l RWMutex
	const d = 20 * time.Millisecond
	l.RLockShort()
	require.False(t, l.TryLock(), "a short shared hold must exclude a writer")
	time.Sleep(d)
	l.RUnlockShort()
	require.Zero(t, l.Stats().MaxShared)
	require.True(t, l.TryLock())
	l.Unlock()

	l.Reset()
	l.RLockShort()
	l.RLock()
	time.Sleep(d)
	l.RUnlock()
	require.False(t, l.TryLock(), "the short holder still holds it")
	l.RUnlockShort()
	st := l.Stats()
	require.GreaterOrEqual(t, st.MaxShared, d)
	require.Contains(t, st.SharedBy, "TestCloneReadShortHoldsNotTimed")

	// A writer waiting for a short hold gets the lock once it ends.
	l.RLockShort()
	locked := make(chan struct{})
	go func() {
		l.Lock()
		close(locked)
		l.Unlock()
	}()
	select {
	case <-locked:
		t.Fatal("the writer took the lock under a short shared hold")
	case <-time.After(d):
	}
	l.RUnlockShort()
	<-locked
}

func TestMax(t *testing.T) {
	var x Max
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 1000 {
				x.Note(int64(i*1000 + j))
			}
		}()
	}
	wg.Wait()
	require.Equal(t, int64(7999), x.Load())
	x.Reset()
	require.Zero(t, x.Load())
}

// A shared wait, by RLock or RLockShort, is its caller's, not the lock's
// own wait helper's.
func TestSharedWaitAttributedToCaller(t *testing.T) {
	for _, short := range []bool{false, true} {
		var l RWMutex
		l.Lock()
		done := make(chan struct{})
		go func() {
			defer close(done)
			waitShared(&l, short)
		}()
		// The waiter counts itself in waiting before it blocks: wait for
		// that (no clock), then hold on a little so the wait is long.
		for l.waiting.Load() == 0 {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(5 * time.Millisecond)
		l.Unlock()
		<-done
		st := l.Stats()
		require.Positive(t, st.MaxWait, "short %v", short)
		require.Contains(t, st.WaitBy, "waitShared", "short %v", short)
	}
}

// waitShared takes l shared, by RLockShort if short, and reads under it
// the number of goroutines waiting for it (none but this one's writer).
func waitShared(l *RWMutex, short bool) int32 {
	if short {
		l.RLockShort()
		defer l.RUnlockShort()
	} else {
		l.RLock()
		defer l.RUnlock()
	}
	return l.waiting.Load()
}
