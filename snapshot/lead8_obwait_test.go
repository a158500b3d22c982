package snapshot

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A writer that finds the origin buffer full while another drain holds
// drainMu waits for room, not for the whole drain: here the test holds
// drainMu and drains (as the committer does); the writer must finish
// while drainMu is still held. A drain that ends without making room
// wakes the writer too, which then drains itself. Every byte is where it
// belongs after both.
func TestLead8BufferWaitForRoom(t *testing.T) {
	const cs = 4 << 10
	s, _ := newMemStore512(t, 256<<10, 4<<20, Options{ChunkSize: cs, JournalSize: 256 << 10, CommitInterval: -1, OriginBuffer: 4 * cs})
	o := s.Origin()
	_, err := s.CreateSnapshot("snap", o)
	require.NoError(t, err)
	model := blockdevtest.ReadAll(t, o)
	write := func(c int64) <-chan error {
		done := make(chan error, 1)
		go func() {
			p := bytes.Repeat([]byte{byte(c + 1)}, cs)
			_, err := o.WriteAt(p, c*cs)
			done <- err
		}()
		copy(model[c*cs:], bytes.Repeat([]byte{byte(c + 1)}, cs))
		return done
	}
	wait := func(done <-chan error, what string) {
		t.Helper()
		select {
		case err := <-done:
			require.NoError(t, err, what)
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: the writer is still waiting", what) // a hang, not a timing
		}
	}
	for c := range int64(4) {
		wait(write(c), "filling the buffer")
	}
	require.EqualValues(t, 4, s.ob.n.Load())

	// Room made by a drain still holding drainMu.
	s.ob.drainMu.Lock()
	done := write(4)
	if !waitUntil(s.obWaiting) {
		s.obDrainUnlock()
		t.Fatal("the writer does not wait for room while a drain holds drainMu")
	}
	require.NoError(t, s.drainLocked(context.Background(), false))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		s.obDrainUnlock()
		t.Fatal("room made while drainMu is held: the writer is still waiting (for the whole drain)")
	}
	s.obDrainUnlock()

	// A drain that ends without making room: the writer drains itself.
	for c := int64(5); s.ob.n.Load() < 4; c++ {
		wait(write(c), "refilling the buffer")
	}
	s.ob.drainMu.Lock()
	done = write(9)
	ok := waitUntil(s.obWaiting)
	s.obDrainUnlock()
	require.True(t, ok, "the writer does not wait for room while a drain holds drainMu")
	wait(done, "a drain that made no room")
	require.LessOrEqual(t, s.ob.n.Load(), int64(4))
	require.Equal(t, -1, blockdevtest.FirstDiff(blockdevtest.ReadAll(t, o), model))
	require.NoError(t, s.Check())
}

// obWaiting reports whether a writer waits in obWait for room.
func (s *Store) obWaiting() bool {
	s.ob.mu.Lock()
	defer s.ob.mu.Unlock()
	return s.ob.waiting > 0
}

// waitUntil polls cond until it holds (a goroutine reaching its wait);
// false only if it never does within 30 s (a hang, not a timing).
func waitUntil(cond func() bool) bool {
	for start := time.Now(); !cond(); time.Sleep(time.Millisecond) {
		if time.Since(start) > 30*time.Second {
			return false
		}
	}
	return true
}
