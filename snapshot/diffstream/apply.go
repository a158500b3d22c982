package diffstream

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/blocksnap/blocksnap/blockdev"
)

// ApplyOptions configures Apply. The zero value is safe: a full stream
// applies onto any target, an incremental one only onto a target known to
// be at its From snapshot, which needs a state file; without one it is
// refused unless forced.
type ApplyOptions struct {
	// Force skips the check that the target is at the stream's From
	// snapshot: it applies the stream even when the state file says
	// otherwise (or holds another stream in part), or when there is no
	// state file, and re-applies a stream the target already holds. An
	// unreadable state file is then ignored. Applying an incremental
	// stream onto a target not at From leaves it matching no snapshot.
	Force bool
	// StatePath is the state file recording where the target is (see
	// State); the command line uses DefaultStatePath(target). Empty: no
	// state is kept, so Apply can neither check the target nor resume: a
	// full stream applies, an incremental one needs Force.
	StatePath string
	// CheckpointBytes is how many bytes are applied between checkpoints
	// (a target Flush, then the state file updated). Zero means 8 MiB.
	CheckpointBytes int64
	// Progress, if not nil, is called after each record.
	Progress func(Progress)
}

// Result says what Apply did.
type Result struct {
	Header Header
	// Totals are the stream's totals (verified from END on success).
	Totals Totals
	// Applied is the number of records written to the target by this
	// call; Resumed the number skipped because an earlier, interrupted
	// apply had made them durable.
	Applied, Resumed int64
	// NoOp is set when the target already held the stream's To snapshot
	// and nothing was written.
	NoOp bool
}

// Apply reads a stream from r and writes it onto target. See ApplyReader.
func Apply(ctx context.Context, r io.Reader, target blockdev.Device, opts ApplyOptions) (Result, error) {
	sr, err := NewReader(r)
	if err != nil {
		return Result{}, err
	}
	defer sr.Close()
	return ApplyReader(ctx, sr, target, opts)
}

// ApplyReader writes the stream sr (whose header has been read) onto
// target, keeping the state file opts.StatePath:
//
//   - The target must have the stream's volume size; otherwise ErrMismatch.
//     A target whose block size is larger than the stream's gets the
//     records' unaligned edges by read-modify-write.
//   - An incremental stream (From set) is refused with ErrMismatch unless
//     the state says the target is at From, or opts.Force; with no
//     opts.StatePath nothing says where the target is, so it is refused
//     unless forced.
//   - A full stream applies onto any target: it rewrites every byte.
//   - A target already at To: the stream is read and verified, nothing is
//     written, and Result.NoOp is set (unless opts.Force).
//   - A target partially applied from this same stream (same From and To)
//     resumes at the first record not recorded as durable.
//   - Every CheckpointBytes the target is flushed and the state records
//     the records applied so far. At END the target is flushed and the
//     state says "at To".
//   - On any error (a corrupt or truncated stream, a failing reader or
//     target, ctx ending), the target is flushed and the state records how
//     far the stream got, so that the state file says exactly what the
//     target holds; the error says it too.
//
// Every record is verified before it is written, so no byte of a damaged
// record reaches the target.
func ApplyReader(ctx context.Context, sr *Reader, target blockdev.Device, opts ApplyOptions) (Result, error) {
	h := sr.Header()
	res := Result{Header: h}
	if target.Size() != h.VolumeSize {
		return res, fmt.Errorf("%w: target is %d bytes, the stream's volume %d", ErrMismatch, target.Size(), h.VolumeSize)
	}
	a := applier{ctx: ctx, sr: sr, dev: target, opts: opts, res: &res}
	if a.opts.CheckpointBytes <= 0 {
		a.opts.CheckpointBytes = 8 << 20
	}
	if err := a.plan(); err != nil {
		return res, err
	}
	if res.NoOp {
		return res, a.drain()
	}
	return res, a.run()
}

// applier is the state of one ApplyReader.
type applier struct {
	ctx    context.Context
	sr     *Reader
	dev    blockdev.Device
	opts   ApplyOptions
	res    *Result
	state  State
	resume int64 // records below this index are already durable
	next   int64 // records below this index have been written by this run or earlier
	done   int64 // volume bytes covered, for progress
	rmw    []byte
}

// howToForce ends a refusal: how to apply the stream all the same.
const howToForce = "ApplyOptions.Force, or blocksnap apply-diff --force, applies it anyway"

// plan reads the state and decides whether to apply, resume, skip or
// refuse.
func (a *applier) plan() error {
	h := a.sr.Header()
	if a.opts.StatePath == "" {
		if h.Full() || a.opts.Force {
			return nil
		}
		return fmt.Errorf("%w: no state file says where the target is; this incremental stream needs it at %s (keep a state file, or %s)", ErrMismatch, h.From, howToForce)
	}
	st, err := ReadState(a.opts.StatePath)
	if err != nil {
		if !a.opts.Force {
			return err
		}
		st = State{}
	}
	a.state = st
	p := st.Partial
	same := p != nil && p.From.Same(h.From) && p.To.Same(h.To)
	switch {
	case same:
		a.resume = p.Records
	case !a.opts.Force && p == nil && st.At != nil && st.At.Same(h.To):
		a.res.NoOp = true
	case a.opts.Force || h.Full():
	case p != nil:
		return fmt.Errorf("%w: target is %s; this stream is %s -> %s (%s)", ErrMismatch, st, h.From, h.To, howToForce)
	case st.At == nil:
		return fmt.Errorf("%w: target state is unknown (no %s); this incremental stream needs it at %s (%s)", ErrMismatch, a.opts.StatePath, h.From, howToForce)
	case !st.At.Same(h.From):
		return fmt.Errorf("%w: target is at %s, this stream applies onto %s (%s)", ErrMismatch, st.At, h.From, howToForce)
	}
	return nil
}

// drain reads and verifies a stream the target already holds.
func (a *applier) drain() error {
	for {
		if err := a.ctx.Err(); err != nil {
			return err
		}
		_, err := a.sr.Next()
		if err == io.EOF {
			a.res.Totals = a.sr.Totals()
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w (target unchanged, still at %s)", err, a.state.At)
		}
	}
}

func (a *applier) saveState(s State) error {
	if a.opts.StatePath == "" {
		return nil
	}
	s.VolumeSize = a.dev.Size()
	if err := WriteState(a.opts.StatePath, s); err != nil {
		return err
	}
	a.state = s
	return nil
}

func (a *applier) partial() State {
	h := a.sr.Header()
	return State{Partial: &Partial{From: h.From, To: h.To, Records: a.next}}
}

// checkpoint flushes the target and records the records written so far.
func (a *applier) checkpoint() error {
	if err := a.dev.Flush(); err != nil {
		return fmt.Errorf("diffstream: flush target: %w", err)
	}
	return a.saveState(a.partial())
}

func (a *applier) run() error {
	h := a.sr.Header()
	// Before the first write the target stops being at any snapshot.
	if err := a.saveState(State{Partial: &Partial{From: h.From, To: h.To, Records: a.resume}}); err != nil {
		return err
	}
	a.next = a.resume
	err := a.loop()
	if err == nil {
		if err = a.dev.Flush(); err != nil {
			err = fmt.Errorf("diffstream: flush target: %w", err)
		} else {
			a.res.Totals = a.sr.Totals()
			return a.saveState(State{At: &h.To})
		}
	}
	// Record how far the stream got, if the target can still be flushed;
	// otherwise the state keeps the last checkpoint, which stays true.
	if cerr := a.checkpoint(); cerr != nil {
		return fmt.Errorf("%w; target is %s (recording progress failed: %v)", err, a.state, cerr)
	}
	return fmt.Errorf("%w; target is %s", err, a.state)
}

func (a *applier) loop() error {
	h := a.sr.Header()
	var sinceCheckpoint int64
	for {
		if err := a.ctx.Err(); err != nil {
			return err
		}
		rec, err := a.sr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if rec.Index < a.resume {
			a.res.Resumed++
		} else {
			if err := a.write(rec); err != nil {
				return err
			}
			a.res.Applied++
			// Zeroing is cheap however large; count it as one block.
			sinceCheckpoint += 4096
			if rec.Type == TypeData {
				sinceCheckpoint += rec.Len
			}
		}
		a.next = rec.Index + 1
		a.done += rec.Len
		if sinceCheckpoint >= a.opts.CheckpointBytes {
			if err := a.checkpoint(); err != nil {
				return err
			}
			sinceCheckpoint = 0
		}
		if a.opts.Progress != nil {
			total := int64(0)
			if h.Full() {
				total = h.VolumeSize
			}
			a.opts.Progress(Progress{Totals: a.sr.Totals(), Done: a.done, Total: total})
		}
	}
}

// write applies one verified record to the target.
func (a *applier) write(rec Record) error {
	tbs := int64(a.dev.BlockSize())
	if rec.Off%tbs != 0 || rec.Len%tbs != 0 {
		return a.overlay(rec, tbs)
	}
	if rec.Type == TypeData {
		if _, err := a.dev.WriteAt(rec.Data, rec.Off); err != nil {
			return fmt.Errorf("diffstream: write target at %d: %w", rec.Off, err)
		}
		return nil
	}
	err := a.dev.Discard(rec.Off, rec.Len)
	if errors.Is(err, blockdev.ErrNotSupported) {
		err = blockdev.WriteZeroes(a.dev, rec.Off, rec.Len)
	}
	if err != nil {
		return fmt.Errorf("diffstream: zero target [%d, +%d): %w", rec.Off, rec.Len, err)
	}
	return nil
}

// overlay applies a record that is not aligned to the target's (larger)
// block size: the aligned interior of a ZERO record is zeroed directly,
// and everything else is read, patched in memory and written back. It
// stays idempotent: the patched bytes are the record's, the rest the
// target's own.
func (a *applier) overlay(rec Record, tbs int64) error {
	lo, hi := rec.Off, rec.Off+rec.Len
	if rec.Type == TypeZero {
		in0, in1 := (lo+tbs-1)/tbs*tbs, hi/tbs*tbs
		if in1-in0 >= tbs {
			if err := a.write(Record{Type: TypeZero, Off: in0, Len: in1 - in0}); err != nil {
				return err
			}
			for _, r := range [][2]int64{{lo, in0}, {in1, hi}} {
				if r[1] > r[0] {
					if err := a.overlay(Record{Type: TypeZero, Off: r[0], Len: r[1] - r[0]}, tbs); err != nil {
						return err
					}
				}
			}
			return nil
		}
	}
	a0, a1 := lo/tbs*tbs, (hi+tbs-1)/tbs*tbs
	if int64(cap(a.rmw)) < a1-a0 {
		a.rmw = make([]byte, a1-a0)
	}
	buf := a.rmw[:a1-a0]
	if _, err := a.dev.ReadAt(buf, a0); err != nil {
		return fmt.Errorf("diffstream: read target at %d: %w", a0, err)
	}
	if rec.Type == TypeData {
		copy(buf[lo-a0:], rec.Data)
	} else {
		clear(buf[lo-a0 : hi-a0])
	}
	if _, err := a.dev.WriteAt(buf, a0); err != nil {
		return fmt.Errorf("diffstream: write target at %d: %w", a0, err)
	}
	return nil
}
