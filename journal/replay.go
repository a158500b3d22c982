package journal

import (
	"errors"
	"fmt"
)

// scanResult is what a scan of the log found.
type scanResult struct {
	tail    int64  // apos after the last valid batch
	lastSeq uint64 // last record seen (0: none)
	spans   spanRing
	// stop says why the scan ended (for tests and debugging): nil when it
	// ran into the end of the log window.
	stop error
}

// scan reads the log from the checkpoint's replay start forward, batch by
// batch, and calls replay for every record after the checkpoint's upTo. It
// stops at the first batch that is not valid, or not the legitimate
// successor of the one before it: wrong journal id or position (foreign,
// misdirected, or left from an earlier lap), an epoch older than its
// predecessor's (written before a crash that an Open since has cut off), or
// a sequence that does not continue. It reads at most the log's size.
// Errors from replay are returned; invalid batches are not errors.
func (j *Journal) scan(c checkpointRef, replay func(seq uint64, payload []byte) error) (scanResult, error) {
	res := scanResult{tail: int64(c.start)}
	start := int64(c.start)
	if start%j.bs != 0 {
		return res, corruptf("replay start %d not block aligned", start)
	}
	buf := make([]byte, min(roundUp(batchHdrSize+maxBatchData, j.bs), j.logSize))
	apos := start
	prevEpoch := c.startEpoch
	var prevLast uint64
	deliver := func(seq uint64, payload []byte) error {
		if seq <= c.upTo {
			return nil
		}
		if err := replay(seq, payload); err != nil {
			return fmt.Errorf("journal: replay record %d: %w", seq, err)
		}
		return nil
	}
	for {
		room := j.logSize - (apos - start)
		if room < j.bs {
			break
		}
		if err := j.logIO(buf[:j.bs], apos, false); err != nil {
			return res, fmt.Errorf("journal: read log at %d: %w", apos, err)
		}
		h, err := decodeBatchHeader(buf[:j.bs], apos)
		if err == nil && h.id == j.id && h.apos > uint64(apos) {
			// Only the future can have written here: the log has moved on
			// past the superblock in use, so that superblock is stale (the
			// newest copy was lost) and replaying from it would silently
			// drop records.
			return res, corruptf("log at %d holds a batch for later position %d: superblock is stale", apos, h.apos)
		}
		if err == nil {
			err = j.successor(h, apos, room, prevEpoch, prevLast, c.upTo)
		}
		if err != nil {
			res.stop = err
			break
		}
		size := roundUp(batchHdrSize+int64(h.length), j.bs)
		if size > j.bs {
			if err := j.logIO(buf[j.bs:size], apos+j.bs, false); err != nil {
				return res, fmt.Errorf("journal: read log at %d: %w", apos+j.bs, err)
			}
		}
		data := buf[batchHdrSize : batchHdrSize+int(h.length)]
		if err := checkRecords(data, h, apos); err != nil {
			res.stop = err
			break
		}
		if err := eachRecord(data, deliver); err != nil {
			return res, err
		}
		res.spans.push(span{apos: apos, size: size, firstSeq: h.firstSeq, count: h.count, epoch: h.epoch})
		prevEpoch = h.epoch
		prevLast = h.firstSeq + uint64(h.count) - 1
		res.lastSeq = prevLast
		apos += size
		res.tail = apos
	}
	return res, nil
}

// errStale marks a well-formed batch that is not the successor of the log
// so far.
var errStale = errors.New("stale or foreign batch")

// successor checks that the batch with header h at apos legitimately
// follows the previous one (prevLast == 0: it is the first after the
// checkpoint, whose upTo is upTo) and fits the room left in the log window.
func (j *Journal) successor(h batchHeader, apos, room int64, prevEpoch, prevLast, upTo uint64) error {
	stale := func(format string, args ...any) error {
		return fmt.Errorf("%w: batch at log %d: %w: "+format, append([]any{ErrCorrupt, apos, errStale}, args...)...)
	}
	switch {
	case h.id != j.id:
		return stale("journal id %#x, want %#x", h.id, j.id)
	case h.apos != uint64(apos):
		return stale("written for log position %d", h.apos)
	case h.epoch < prevEpoch:
		return stale("epoch %d before %d", h.epoch, prevEpoch)
	case roundUp(batchHdrSize+int64(h.length), j.bs) > room:
		return stale("%d bytes, %d left in the log", h.length, room)
	}
	switch {
	case prevLast == 0:
		// First batch: it holds upTo+1, or precedes it (records appended
		// before the checkpoint but written after it).
		if h.firstSeq > upTo+1 {
			return stale("first sequence %d after checkpoint %d", h.firstSeq, upTo)
		}
	case h.epoch == prevEpoch:
		if h.firstSeq != prevLast+1 {
			return stale("sequence %d after %d", h.firstSeq, prevLast)
		}
	default:
		// A new epoch continues from what its Open recovered: the last
		// record, or the checkpoint if that was later.
		if h.firstSeq != max(prevLast, upTo)+1 {
			return stale("sequence %d after %d in a new epoch", h.firstSeq, prevLast)
		}
	}
	return nil
}
