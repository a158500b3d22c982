package snapshot

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/stretchr/testify/require"
)

// TestCollectorAppendWhileCaptureOutstanding: the collector passes
// makeLogRoom while the log is below emergencyFill, and other writers that
// passed it too fill the log before the collector takes mu. A capture is
// outstanding (the checkpointer is still writing it), so logLocked posts
// none, and the collector's Append waits for log space holding mu. The
// outstanding capture frees only the records up to its own upTo, not
// those logged since; the next capture needs mu. This used to hang: the
// collector waited in Append for ever, and the checkpointer waited for mu
// to end its capture. Now logLocked waits, holding mu, for the outstanding
// capture to free its part of the log, and captures again, before it
// changes anything.
func TestCollectorAppendWhileCaptureOutstanding(t *testing.T) {
	s := captureTestStore(t)
	var err error

	// The checkpointer is slow to write this capture: it stays
	// outstanding while the log fills.
	s.mu.Lock()
	c1, err := s.captureLocked()
	s.mu.Unlock()
	require.NoError(t, err)

	// Park the collector between its makeLogRoom (the log is nearly
	// empty: it passes) and its mu: hold the origin's stripes, which it
	// takes before, then mu, then let the stripes go.
	for i := range s.originLocks {
		s.originLocks[i].Lock()
	}
	op, err := s.Delete("s")
	require.NoError(t, err)
	hangGuard(t, 30*time.Second, func() { waitForStack(t, "(*Store).lockStripes", "(*Store).collect") })
	s.mu.Lock()
	for i := range s.originLocks {
		s.originLocks[i].Unlock()
	}
	hangGuard(t, 30*time.Second, func() { waitForStack(t, "sync.(*RWMutex).Lock", "(*Store).collectBatch") })
	// Meanwhile writers that passed makeLogRoom too fill the log to the
	// last byte (records of no change stand for theirs).
	full, cancel := context.WithCancel(context.Background())
	cancel()
	rec := encodeRecord(nil, nil)
	for {
		if _, err := s.j.Append(full, rec); err != nil {
			require.ErrorIs(t, err, context.Canceled)
			break
		}
	}
	s.mu.Unlock()
	// The collector takes mu and keeps it: it is in logLocked (its Append
	// waits there for log space) before the capture is written.
	hangGuard(t, 30*time.Second, func() { waitForStack(t, "(*Store).logLocked", "(*Store).collectBatch") })

	hangGuard(t, 30*time.Second, func() {
		require.NoError(t, s.writeCheckpoint(c1))
		require.NoError(t, op.Wait(context.Background()))
		require.NoError(t, s.Check())
		require.NoError(t, s.Close())
	})
}

// waitForStack polls the goroutine dump until one goroutine's stack holds
// every string of want, in order from its top (callers guard it with
// hangGuard).
func waitForStack(t *testing.T, want ...string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			i := 0
			for _, w := range want {
				j := strings.Index(g[i:], w)
				if j < 0 {
					i = -1
					break
				}
				i += j + len(w)
			}
			if i >= 0 {
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
}

// captureTestStore is the store the capture-takeover tests start from: a
// 64 KiB journal, no committer, one snapshot of the origin, 32 chunks
// copied for it and checkpointed.
func captureTestStore(t *testing.T) *Store {
	t.Helper()
	origin, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	mem, err := blockdev.NewMem(64<<20, 4096)
	require.NoError(t, err)
	s, err := Format(origin, mem, Options{ChunkSize: 4 << 10, JournalSize: 64 << 10, CommitInterval: -1})
	require.NoError(t, err)
	o := s.Origin()
	_, err = s.CreateSnapshot("s", o)
	require.NoError(t, err)
	buf := make([]byte, 4096)
	for c := int64(0); c < 64; c += 2 {
		buf[0] = byte(c)
		_, err = o.WriteAt(buf, c*4096)
		require.NoError(t, err)
	}
	require.NoError(t, s.Checkpoint(context.Background()))
	return s
}
