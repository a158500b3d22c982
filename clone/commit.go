package clone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/bits-and-blooms/bitset"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/journal"
)

// Commit protocol. A region is marked hydrated in memory only after its data
// is in the destination (written, maybe not flushed). A commit takes the
// regions hydrated since the last one, appends them to the journal and
// commits it; the journal's group-commit leader takes the records and then
// calls PreCommit, which flushes the destination, before it writes them.
// So every region the metadata calls hydrated has its data durable in the
// destination: after a crash it reads source data or data the user wrote.
// dm-clone shipped with metadata committed first, and a crash right after a
// commit could leave regions marked hydrated whose data the destination's
// cache had lost.

// journalSizeFor returns the journal region for a clone of regions regions.
func journalSizeFor(regions uint64) int64 {
	return 2*4096 + 2*checkpointSlotFor(regions) + minLog
}

// minLog is the smallest record log we lay out (the journal takes whatever
// the metadata device has beyond the checkpoint slots).
const minLog = 256 << 10

// checkpointSlotFor is the size of one checkpoint slot: the bitmap
// checkpoint and a block of slack.
func checkpointSlotFor(regions uint64) int64 {
	n := int64(bitmapHeader+8*((regions+63)/64)+4) + 4096
	return (n + 4095) / 4096 * 4096
}

func (m *metadata) journalOptions() journal.Options {
	return journal.Options{
		PreCommit:      m.preCommit,
		CheckpointSize: m.geo.CheckpointSize,
	}
}

// preCommit flushes the destination before the journal writes records or
// switches checkpoints.
func (m *metadata) preCommit() error {
	if m.bugOrder {
		return nil
	}
	if err := m.dst.Flush(); err != nil {
		return fmt.Errorf("clone: flush destination: %w", err)
	}
	return nil
}

func (m *metadata) journalDev() (blockdev.Device, error) {
	return blockdev.Slice(m.meta, m.geo.JournalOffset, m.geo.JournalLength)
}

// formatMetadata writes a new superblock and an empty journal.
func formatMetadata(c *Clone, g geometry) (*metadata, error) {
	m := newMetadata(c, g)
	sb := blockdev.AlignedBuffer(superArea)
	copy(sb, g.encode())
	if _, err := c.meta.WriteAt(sb, 0); err != nil {
		return nil, fmt.Errorf("clone: create: write superblock: %w", err)
	}
	jd, err := m.journalDev()
	if err != nil {
		return nil, fmt.Errorf("clone: create: %w", err)
	}
	// Format flushes the metadata device, superblock included.
	if m.j, err = journal.Format(jd, m.journalOptions()); err != nil {
		return nil, fmt.Errorf("clone: create: %w", err)
	}
	if err := m.openSession(); err != nil {
		_ = m.j.Close()
		return nil, fmt.Errorf("clone: create: %w", err)
	}
	return m, nil
}

// openMetadata recovers the bitmap from the journal.
func openMetadata(c *Clone, g geometry) (*metadata, error) {
	m := newMetadata(c, g)
	jd, err := m.journalDev()
	if err != nil {
		return nil, fmt.Errorf("clone: open: %w", err)
	}
	rp := &replayer{regions: g.Regions, bm: bitset.New(uint(g.Regions))}
	openJournal := journal.Open
	if c.opts.ReadOnly {
		openJournal = journal.OpenReadOnly
	}
	if m.j, err = openJournal(jd, m.journalOptions(), rp); err != nil {
		return nil, fmt.Errorf("clone: open: %w", err)
	}
	if rp.unsynced {
		_ = m.j.Close()
		return nil, fmt.Errorf("clone: open: %w", ErrUnclean)
	}
	m.load(rp.bm)
	m.lastSeq = m.j.LastSeq()
	m.ckptSeq = m.lastSeq - uint64(rp.records)
	if err := m.openSession(); err != nil {
		_ = m.j.Close()
		return nil, fmt.Errorf("clone: open: %w", err)
	}
	return m, nil
}

// openSession records, durably, that an unsynced session starts, so that a
// crash before the clean Close is detected at Open.
func (m *metadata) openSession() error {
	if !m.nosync || m.j.ReadOnly() {
		return nil
	}
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	if err := m.appendSession(context.Background(), true); err != nil {
		return err
	}
	return m.j.Commit(context.Background())
}

// appendSession appends a session record. Called with commitMu held.
func (m *metadata) appendSession(ctx context.Context, unsynced bool) error {
	seq, err := m.j.Append(ctx, encodeSession(unsynced))
	if err != nil {
		return err
	}
	m.durMu.Lock()
	defer m.durMu.Unlock()
	m.lastSeq, m.unsynced = seq, unsynced
	return nil
}

// replayer rebuilds the bitmap from a checkpoint and records.
type replayer struct {
	regions  uint64
	bm       *bitset.BitSet
	unsynced bool
	records  int
}

func (r *replayer) LoadCheckpoint(rd io.Reader) error {
	bm, unsynced, err := readBitmap(rd, r.regions)
	if err != nil {
		return err
	}
	r.bm, r.unsynced = bm, unsynced
	return nil
}

func (r *replayer) Replay(seq uint64, payload []byte) error {
	rec, err := decodeRecord(payload, r.regions, seq)
	if err != nil {
		return err
	}
	r.records++
	switch rec.kind {
	case recSession:
		r.unsynced = rec.unsynced
	case recHydrated:
		for _, s := range rec.spans {
			r.bm.SetRange(uint(s.start), uint(s.start+s.n))
		}
	}
	return nil
}

// flush is a user Flush: the destination, then (unless metadata sync is
// off) the metadata if anything became hydrated.
func (m *metadata) flush(nosync bool) error {
	if nosync {
		if err := m.dst.Flush(); err != nil {
			return fmt.Errorf("clone: flush destination: %w", err)
		}
		return nil
	}
	return m.commit(context.Background())
}

// commit makes every region hydrated before the call durably hydrated, and
// every write to hydrated regions that completed before the call durable.
func (m *metadata) commit(ctx context.Context) error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.takeDirty()
	if len(m.spans) == 0 {
		// Nothing for the metadata: the destination alone.
		if err := m.dst.Flush(); err != nil {
			return fmt.Errorf("clone: flush destination: %w", err)
		}
		return nil
	}
	err := m.appendSpans(ctx)
	if err == nil {
		err = m.j.Commit(ctx)
	}
	if err != nil {
		m.restoreDirty(m.spans)
		err = fmt.Errorf("clone: commit metadata: %w", err)
		if ctx.Err() == nil { // a commit cut short by Close is not a failure
			m.setErr(err)
		}
		return err
	}
	if m.afterCommit != nil {
		m.afterCommit()
	}
	if m.bugOrder {
		if err := m.dst.Flush(); err != nil {
			return fmt.Errorf("clone: flush destination: %w", err)
		}
	}
	m.commits.Add(1)
	return nil
}

// appendSpans appends m.spans as records, one at a time, recording each in
// durable (what the next checkpoint holds) as it is appended. Called with
// commitMu held. When the log is half full it commits and checkpoints
// first, so Append never waits for space (nobody else would free it).
func (m *metadata) appendSpans(ctx context.Context) error {
	for spans := m.spans; len(spans) > 0; {
		if m.j.Stats().Fill > 0.5 {
			if err := m.j.Commit(ctx); err != nil {
				return err
			}
			if err := m.checkpoint(ctx); err != nil {
				return err
			}
		}
		k := min(len(spans), spansPerRecord)
		if err := m.appendRecord(ctx, encodeHydrated(spans[:k]), spans[:k]); err != nil {
			return err
		}
		spans = spans[k:]
	}
	return nil
}

// appendRecord appends one record and applies its spans to durable under
// durMu, so that a checkpoint sees both or neither.
func (m *metadata) appendRecord(ctx context.Context, rec []byte, spans []span) error {
	seq, err := m.j.Append(ctx, rec)
	if err != nil {
		return err
	}
	m.durMu.Lock()
	defer m.durMu.Unlock()
	m.lastSeq = seq
	for _, s := range spans {
		m.durable.SetRange(uint(s.start), uint(s.start+s.n))
	}
	return nil
}

// checkpoint writes the durable bitmap as a checkpoint, trimming the log.
func (m *metadata) checkpoint(ctx context.Context) error {
	m.durMu.Lock()
	snap := m.durable.Clone()
	upTo, unsynced := m.lastSeq, m.unsynced
	m.durMu.Unlock()
	err := m.j.Checkpoint(ctx, upTo, func(w io.Writer) error {
		return writeBitmap(w, snap, m.regions, unsynced)
	})
	if err != nil {
		err = fmt.Errorf("clone: checkpoint: %w", err)
		if ctx.Err() == nil {
			m.setErr(err)
		}
		return err
	}
	m.durMu.Lock()
	m.ckptSeq = max(m.ckptSeq, upTo)
	m.durMu.Unlock()
	return nil
}

// committer commits every interval and checkpoints when the journal asks,
// until ctx is done.
func (m *metadata) committer(ctx context.Context, interval time.Duration) {
	var tick <-chan time.Time
	if interval > 0 && !m.nosync {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	need := m.j.NeedCheckpoint()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
			if m.pending() > 0 {
				_ = m.commit(ctx) // recorded for Status; the next tick retries
			}
		case <-m.early:
			if tick != nil && m.pending() > 0 {
				_ = m.commit(ctx)
			}
		case _, ok := <-need:
			if !ok {
				return
			}
			_ = m.checkpoint(ctx)
		}
	}
}

// close commits what is left (ending an unsynced session cleanly),
// checkpoints if records were appended since the last checkpoint, and
// closes the journal.
func (m *metadata) close() error {
	if m.j.ReadOnly() {
		return m.j.Close() // nothing was hydrated or written
	}
	ctx := context.Background()
	err := m.commit(ctx)
	if err == nil && m.nosync {
		m.commitMu.Lock()
		err = m.appendSession(ctx, false)
		if err == nil {
			err = m.j.Commit(ctx)
		}
		m.commitMu.Unlock()
	}
	if err == nil {
		m.durMu.Lock()
		need := m.lastSeq > m.ckptSeq
		m.durMu.Unlock()
		if need {
			err = m.checkpoint(ctx)
		}
	}
	if cerr := m.j.Close(); cerr != nil && !errors.Is(cerr, journal.ErrClosed) && err == nil {
		err = cerr
	}
	return err
}
