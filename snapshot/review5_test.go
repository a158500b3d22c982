package snapshot

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// checkpointerInEndCapture reports whether the checkpointer goroutine is
// in endCapture (waiting for mu).
func checkpointerInEndCapture() bool {
	buf := make([]byte, 4<<20)
	n := runtime.Stack(buf, true)
	for _, g := range strings.Split(string(buf[:n]), "\n\n") {
		if strings.Contains(g, "(*Store).endCapture") && strings.Contains(g, "(*Store).checkpointer") {
			return true
		}
	}
	return false
}

// TestReview5CaptureTakenTwice: capTaken holds one capture. A writer
// waiting for log space takes over the checkpointer's capture X (capTaken
// = X) while the checkpointer's endCapture(X) still waits for mu. A
// foreground tree commit (treeCommit: it waits only for capOut) then
// captures Y, and a second writer waiting for log space takes Y over:
// capTaken = Y, overwriting X. If Y's writer reaches mu first (here: it
// was held in releaseFreed by a read in flight, which holds reclaim, and
// the scheduler runs it first), its endCapture clears capTaken while the
// checkpointer is still in endCapture(X). The next writer that finds the
// log full then posts a capture to the checkpointer (capTaken is nil) and
// waits in Append holding mu, which the checkpointer needs before it
// takes the capture: the deadlock that capTaken was added to prevent
// (TestCheckpointerCaptureTakenOverLogStillFull).
//
// The interleaving is made with GOMAXPROCS(1): goroutines readied last
// run first (runnext), so Y's writer, readied after the checkpointer,
// takes mu before it, and this test, readied by Y's writer, next.
func TestReview5CaptureTakenTwice(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	s := captureTestStore(t)
	var err error

	rec := encodeRecord(nil, nil)
	fill := func() { // the log full to the last byte; called with mu held
		full, cancel := context.WithCancel(context.Background())
		cancel()
		for {
			if _, err := s.j.Append(full, rec); err != nil {
				require.ErrorIs(t, err, context.Canceled)
				return
			}
		}
	}

	// X: the checkpointer's capture. It writes it and waits for mu in
	// endCapture.
	s.mu.Lock()
	cx, err := s.captureLocked()
	require.NoError(t, err)
	s.ckptCh <- cx
	<-cx.freed
	waitForStack(t, "(*Store).endCapture", "(*Store).writeCheckpoint", "(*Store).checkpointer")

	// Writer 1 finds the log full and takes X over.
	fill()
	require.NoError(t, s.logRoomLocked(len(rec)))
	require.Contains(t, s.capTaken, cx.freed, "writer 1 did not take the checkpointer's capture over")

	// A read in flight holds reclaim shared (readChunkPart).
	s.reclaim.RLock()
	// A foreground tree commit (treeCommit) captures Y under mu and
	// writes it without; its release of freed chunks waits for the read.
	cy, err := s.captureLocked()
	require.NoError(t, err)
	yDone := make(chan error, 1)
	go func() { yDone <- s.writeCheckpoint(cy) }()
	<-cy.freed
	waitForStack(t, "(*Store).releaseFreed", "(*Store).writeCheckpoint")

	// Writer 2 finds the log full and takes Y over.
	fill()
	require.NoError(t, s.logRoomLocked(len(rec)))
	s.mu.Unlock()       // the checkpointer is readied
	s.reclaim.RUnlock() // then Y's writer: it runs first
	require.NoError(t, <-yDone)
	s.mu.Lock() // writer 3
	if !checkpointerInEndCapture() {
		s.mu.Unlock()
		require.NoError(t, s.Close())
		t.Skip("the scheduler ran the checkpointer first: interleaving not reached")
	}
	pending := !s.capOut && len(s.capTaken) == 0
	// Writer 3 finds the log full: logLocked's logRoomLocked, then Append.
	fill()
	require.NoError(t, s.logRoomLocked(len(rec)))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, aerr := s.j.Append(ctx, rec)
	cancel()
	s.mu.Unlock()
	require.NoError(t, aerr, "Append holding mu never got log room: the capture was posted to the checkpointer, which waits for mu (deadlock)")
	require.False(t, pending, "capTaken was cleared by Y's end while the checkpointer still waits for mu to end X")
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
}
