package meta

import (
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/stretchr/testify/require"
)

// lead7StuckFirst is a device whose first page write after arm made by
// the write-back goroutine blocks until release; every other write goes
// through. It records the order in which writes completed. (Only the
// goroutine's: on a loaded machine a throttled writer helping with the
// queue could make the first write after arm, and then the writer, not
// the goroutine, was stuck, and the test hung.)
type lead7StuckFirst struct {
	blockdev.Device
	mu      sync.Mutex
	cond    *sync.Cond
	armed   bool
	stuck   bool  // the armed write is held
	release bool  // let it go
	stuckAt int64 // its offset
	done    []int64
}

func (d *lead7StuckFirst) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	if d.armed && fromWriteBackLoop() {
		d.armed, d.stuck, d.stuckAt = false, true, off
		d.cond.Broadcast()
		for !d.release {
			d.cond.Wait()
		}
	}
	d.mu.Unlock()
	n, err := d.Device.WriteAt(p, off)
	d.mu.Lock()
	d.done = append(d.done, off)
	d.mu.Unlock()
	return n, err
}

// fromWriteBackLoop reports whether the caller runs in the write-back
// goroutine (Meta.writeBackLoop).
func fromWriteBackLoop() bool {
	pc := make([]uintptr, 64)
	frames := runtime.CallersFrames(pc[:runtime.Callers(2, pc)])
	for {
		f, more := frames.Next()
		if strings.HasSuffix(f.Function, ".writeBackLoop") {
			return true
		}
		if !more {
			return false
		}
	}
}

// TestLead7ThrottledWriterHelpsWriteBack: with the write-back goroutine
// stuck in the device on one page, a throttled writer writes the other
// queued pages itself and gets on (the old Throttle waited for the
// goroutine, and so hung here); a commit still waits for the stuck page,
// queued before its freeze, though more pages than were queued before it
// have been written by then; and everything reads back after a reopen.
func TestLead7ThrottledWriterHelpsWriteBack(t *testing.T) {
	mem, err := blockdev.NewMem(16384*PageSize, 4096)
	require.NoError(t, err)
	dev := &lead7StuckFirst{Device: mem}
	dev.cond = sync.NewCond(&dev.mu)
	// A cache of 2 MiB has 16 write-back slots: one stuck, the rest free to help with.
	opts := Options{DataChunks: 1 << 20, CacheBytes: 2 << 20}
	m, err := Format(dev, opts)
	require.NoError(t, err)
	closed := false
	defer func() {
		dev.mu.Lock()
		dev.release = true // a failed test must not leave Close waiting on the device
		dev.cond.Broadcast()
		dev.mu.Unlock()
		if !closed {
			require.NoError(t, m.Close())
		}
	}()
	m.ResetStalls()
	dev.mu.Lock()
	dev.armed = true
	dev.mu.Unlock()
	var keys []Key
	filled := make(chan struct{})
	go func() {
		defer close(filled)
		// Spread keys, so that each change dirties its own leaf, and
		// throttle as the store does, before each change.
		for i := uint64(0); i < 100_000; i++ {
			if err := m.Throttle(); err != nil {
				t.Error(err)
				return
			}
			k := Key{C: i * 7919 % 1_000_003, E: 1}
			if _, err := m.PutData(k); err != nil {
				t.Error(err)
				return
			}
			keys = append(keys, k)
		}
	}()
	stallHangGuard(t, filled, "throttled changes while the write-back goroutine is stuck in the device")
	st := m.Stalls()
	require.Positive(t, st.Helped, "no throttled writer wrote a page itself")
	dev.mu.Lock()
	require.True(t, dev.stuck, "the goroutine's write never reached the device")
	dev.mu.Unlock()

	// The stuck page is queued before the commit's freeze. The commit
	// must wait for it, however many pages are written meanwhile: more
	// changes after the freeze queue pages that the throttled writer
	// writes itself, until more pages than were queued at the freeze are
	// written, which a count of pages written would take for all of them.
	m.mu.Lock()
	tx := m.tx
	m.mu.Unlock()
	committed := make(chan error, 1)
	go func() { committed <- m.Commit() }()
	for frozen := false; !frozen; {
		runtime.Gosched()
		m.mu.Lock()
		frozen = m.tx > tx
		m.mu.Unlock()
	}
	m.mu.Lock()
	queued := m.wbQueued // at least the freeze's count
	m.mu.Unlock()
	for i := uint64(0); i < 200_000; i++ {
		m.wbMu.Lock()
		written := m.wbWritten
		m.wbMu.Unlock()
		if written > queued {
			break
		}
		require.NoError(t, m.Throttle())
		k := Key{C: 2_000_000 + i*7919%1_000_003, E: 1}
		_, err := m.PutData(k)
		require.NoError(t, err)
		keys = append(keys, k)
	}
	m.wbMu.Lock()
	require.Greater(t, m.wbWritten, queued, "the writes after the freeze did not get past its count")
	require.True(t, m.wbPending(queued), "the stuck page is not pending")
	m.wbMu.Unlock()
	// Give a wrong commit time to end (this cannot fail a right one,
	// which stays blocked until the page is let go; it only makes the
	// wrong one likelier to be seen, and the write order below catches
	// it otherwise).
	select {
	case err := <-committed:
		t.Fatalf("the commit ended (%v) while a page queued before its freeze was stuck", err)
	case <-time.After(100 * time.Millisecond):
	}
	dev.mu.Lock()
	dev.release = true
	dev.cond.Broadcast()
	dev.mu.Unlock()
	select {
	case err := <-committed:
		require.NoError(t, err)
	case <-time.After(time.Minute):
		t.Fatal("Commit after the stuck page was let go: still waiting after a minute")
	}
	require.NoError(t, m.Commit()) // the changes after the freeze
	dev.mu.Lock()
	var stuckDone, superDone = -1, -1
	for i, off := range dev.done {
		if off == dev.stuckAt && stuckDone < 0 {
			stuckDone = i
		}
		if off < 2*PageSize {
			superDone = i // the last superblock write
		}
	}
	dev.mu.Unlock()
	require.GreaterOrEqual(t, stuckDone, 0)
	require.Greater(t, superDone, stuckDone, "the commit's superblock was written before a page it needs")
	require.NoError(t, m.Check())
	require.NoError(t, m.Close())
	closed = true

	m, err = Open(mem, opts)
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	require.NoError(t, m.Check())
	for _, k := range keys {
		_, ok, err := m.Get(k)
		require.NoError(t, err)
		require.True(t, ok, "key %+v lost", k)
	}
}
