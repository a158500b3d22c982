package nbd

import (
	"fmt"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// MapAllocation asks NBD_CMD_BLOCK_STATUS for every extent of the asked
// range in one round trip (no REQ_ONE), answers with the first and keeps
// the rest: a caller that walks the export in order, as a clone's mapper
// does, gets them without another round trip, which over a WAN is what
// mapping costs. A write through the client drops what is kept. Writes by
// other clients of the export are not seen, as they are not by an answer
// already in flight.

// extent is one block status descriptor of our context.
type extent struct {
	n     int64
	flags uint32
}

// maxKeptExtents bounds the descriptors kept from one reply.
const maxKeptExtents = 512

// extentCache is what the last reply said beyond the extent it answered
// with.
type extentCache struct {
	// mu guards the fields below; never held with a lane's locks.
	mu     sync.Mutex
	writes uint64 // Client.writes when the request was sent
	off    int64  // where exts begin
	end    int64  // where the reply's range ends
	exts   []extent
}

// wrote notes a completed write: what the cache holds may be stale.
func (c *Client) wrote() { c.writes.Add(1) }

// MapAllocation implements blockdev.AllocationMapper with
// NBD_CMD_BLOCK_STATUS on base:allocation. Without the context every
// range is reported allocated.
func (c *Client) MapAllocation(off, n int64) (int64, blockdev.Allocation, error) {
	if err := c.check(off, n); err != nil {
		return 0, blockdev.Allocated, err
	}
	if n == 0 || !c.info.BlockStatus {
		return n, blockdev.Allocated, nil
	}
	if l, st, ok := c.cachedExtent(off, n); ok {
		return l, st, nil
	}
	ask := min(n, 1<<31)
	w := c.writes.Load()
	cl, err := c.pick(0).start(cmdBlockStatus, 0, uint64(off), uint32(ask), nil, nil)
	if err != nil {
		return 0, blockdev.Allocated, err
	}
	<-cl.done
	cl.finished = true
	var l int64
	var st blockdev.Allocation
	ok := false
	if cl.err == nil {
		// Read and kept before finish pools the call.
		l, st, ok = c.lookup(cl.exts, off, off+ask, off, n)
		ec := &c.extents
		ec.mu.Lock()
		ec.writes, ec.off, ec.end = w, off, off+ask
		ec.exts = append(ec.exts[:0], cl.exts...)
		ec.mu.Unlock()
	}
	if err := finish(cl, "block status", off); err != nil {
		return 0, blockdev.Allocated, err
	}
	if !ok {
		return 0, blockdev.Allocated, fmt.Errorf("%w: block status reply without an extent at %d", ErrProtocol, off)
	}
	return l, st, nil
}

// cachedExtent answers from the kept extents if they cover off and no
// write completed since they were asked for.
func (c *Client) cachedExtent(off, n int64) (int64, blockdev.Allocation, bool) {
	ec := &c.extents
	ec.mu.Lock()
	defer ec.mu.Unlock()
	if ec.writes != c.writes.Load() {
		return 0, 0, false
	}
	return c.lookup(ec.exts, ec.off, ec.end, off, n)
}

// lookup finds off in extents that begin at base, cut at stop, and
// returns the length MapAllocation reports: whole blocks up to the
// extent's end, at most n.
func (c *Client) lookup(exts []extent, base, stop, off, n int64) (int64, blockdev.Allocation, bool) {
	if off < base {
		return 0, 0, false
	}
	at := base
	for _, e := range exts {
		end := min(at+e.n, stop)
		if off < end {
			l := min(end-off, n)
			if l -= (off + l) % int64(c.info.BlockSize); l <= 0 {
				// Less than a block of the extent is left: say
				// the block is allocated, which is never wrong.
				return int64(c.info.BlockSize), blockdev.Allocated, true
			}
			return l, stateOf(e.flags), true
		}
		if at = end; at >= stop {
			break
		}
	}
	return 0, 0, false
}

// stateOf maps base:allocation flags to an Allocation.
func stateOf(flags uint32) blockdev.Allocation {
	switch {
	case flags&(stateHole|stateZero) == stateHole|stateZero:
		return blockdev.Hole
	case flags&stateZero != 0:
		return blockdev.Zero
	}
	// HOLE without ZERO reads as undefined data: treat it as data.
	return blockdev.Allocated
}
