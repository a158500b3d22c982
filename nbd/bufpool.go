package nbd

import (
	"math/bits"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Buffers for request payloads come from pools by power-of-two size class,
// 4 KiB to MaxRequest, so that the request path does not allocate once
// the pools are warm.
const (
	minBufShift = 12
	maxBufShift = 25 // MaxRequest
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

// bufClass returns the pool index for a buffer of n bytes (n <= MaxRequest).
func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a buffer of at least n bytes (0 <= n <= MaxRequest).
func getBuf(n int) *[]byte {
	k := bufClass(n)
	if p, ok := bufPools[k].Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, 1<<(k+minBufShift))
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(p *[]byte) {
	n := cap(*p)
	k := bufClass(n)
	if n != 1<<(k+minBufShift) {
		return // not one of ours
	}
	*p = (*p)[:n]
	bufPools[k].Put(p)
}

func isZero(b []byte) bool { return blockdev.IsZero(b) }
