package blockdevtest

import (
	"bytes"
	"runtime"
	"testing"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
)

// NewMem returns a zero-filled Mem device; a bad geometry fails t.
func NewMem(t testing.TB, size int64, blockSize int) *blockdev.Mem {
	t.Helper()
	m, err := blockdev.NewMem(size, blockSize)
	if err != nil {
		t.Fatalf("blockdevtest: NewMem(%d, %d): %v", size, blockSize, err)
	}
	return m
}

// ReadAll returns the whole content of d; a read error fails t.
func ReadAll(t testing.TB, d blockdev.Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	if _, err := d.ReadAt(p, 0); err != nil {
		t.Fatalf("blockdevtest: read all %d bytes: %v", len(p), err)
	}
	return p
}

// FirstDiff returns the offset of the first byte at which a and b differ,
// the length of the shorter when one is a prefix of the other, or -1 when
// they are equal.
func FirstDiff(a, b []byte) int {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return n
	}
	return -1
}

// Fill returns n bytes of value b.
func Fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// CheckLeaks fails t if more goroutines run when t ends than when
// CheckLeaks was called. Engines stop their goroutines on Close but those
// exit asynchronously, so it polls for a few seconds before it reports, with
// every goroutine's stack. Call it first in a test: cleanups run last-in
// first-out, so the check then runs after the cleanups that close what the
// test opened.
func CheckLeaks(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<20)
			t.Errorf("%d goroutines leaked:\n%s", n-before, buf[:runtime.Stack(buf, true)])
		}
	})
}
