package snapshot

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCheckpointerCaptureTakenOverLogStillFull: the capture outstanding
// while a writer waits (holding mu) for log space is the checkpointer's
// own, and the records logged after it fill the log by themselves. When
// the capture has freed its part of the log, the writer takes it over
// (ends it) and still finds no room, so it needs another capture written
// while it holds mu. It used to post that one to the checkpointer and wait
// in Append, but the checkpointer was still in the first capture's end,
// waiting for mu: a deadlock, with no CPU used (the hang seen once in
// TestModelWorkloadTinyCache, whose 64 KiB journal and slow one-page-cache
// tree commits let the log fill while a commit is written).
//
// The test hangs on the old code; run it with go test's -timeout (the
// default suite has one), which prints every goroutine.
func TestCheckpointerCaptureTakenOverLogStillFull(t *testing.T) {
	s := captureTestStore(t)
	var err error

	// The capture the checkpointer will write, frozen now and handed to
	// it only once the collector waits for it.
	s.mu.Lock()
	c1, err := s.captureLocked()
	s.mu.Unlock()
	require.NoError(t, err)

	// Park the collector between its makeLogRoom and mu (as in
	// TestCollectorAppendWhileCaptureOutstanding), then fill the log to
	// the last byte with records logged after the capture.
	for i := range s.originLocks {
		s.originLocks[i].Lock()
	}
	op, err := s.Delete("s")
	require.NoError(t, err)
	waitForStack(t, "(*Store).lockStripes", "(*Store).collect")
	s.mu.Lock()
	for i := range s.originLocks {
		s.originLocks[i].Unlock()
	}
	waitForStack(t, "sync.(*RWMutex).Lock", "(*Store).collectBatch")
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
	// The collector holds mu and waits for the outstanding capture to
	// free its part of the log.
	waitForStack(t, "(*Store).logRoomLocked", "(*Store).logLocked", "(*Store).collectBatch")

	// The checkpointer writes the capture; the collector takes it over and
	// still finds the log full (of the records above).
	s.ckptCh <- c1
	require.NoError(t, op.Wait(context.Background()))
	require.NoError(t, s.Check())
	require.NoError(t, s.Close())
}
