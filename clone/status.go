package clone

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/time/rate"

	"github.com/blocksnap/blocksnap/blockdev"
)

// State is what background hydration is doing.
type State int

const (
	// Hydrating: copying regions.
	Hydrating State = iota
	// Paused: stopped by Pause or Options.NoHydration.
	Paused
	// Retrying: the last copy failed; waiting out the backoff.
	Retrying
	// Hydrated: every region is in the destination.
	Hydrated
	// Closed: the clone is closed.
	Closed
)

func (s State) String() string {
	switch s {
	case Hydrating:
		return "hydrating"
	case Paused:
		return "paused"
	case Retrying:
		return "retrying"
	case Hydrated:
		return "hydrated"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// Status is a snapshot of a clone's hydration.
type Status struct {
	State      State
	RegionSize int64
	Regions    uint64 // total
	Hydrated   uint64 // regions in the destination
	InFlight   int    // regions being copied by background hydration
	Threshold  int    // most regions in flight (the cap on the window)
	// InFlightBytes is the bytes background copies have in flight; Window
	// the bytes the adaptive window allows now (it follows the source's
	// bandwidth-delay product, up to Threshold regions).
	InFlightBytes, Window int64
	// SourceRate is the background copies' delivery rate from the source
	// (bytes per second, recent maximum) and SourceLatency their latency
	// (recent minimum): the estimates the window is sized from. Zero until
	// a copy completed.
	SourceRate    float64
	SourceLatency time.Duration
	// RateLimit is the cap on background hydration in bytes per second (0:
	// none).
	RateLimit int64
	// BytesCopied counts bytes read from the source and written to the
	// destination (background and user-driven); BytesSkipped counts bytes
	// hydrated with no copy (all-zero regions, discards, writes of whole
	// regions).
	BytesCopied, BytesSkipped int64
	// Rate is hydration progress in bytes per second since hydration last
	// started or resumed; ETA the time left at that rate (0 if unknown).
	Rate float64
	ETA  time.Duration
	// Errors counts failed background copies; LastError is the latest.
	Errors    int64
	LastError error
	// Commits counts metadata commits; MetadataError is the latest failed
	// commit or checkpoint.
	Commits       int64
	MetadataError error
}

func (s Status) String() string {
	pct := 100.0
	if s.Regions > 0 {
		pct = 100 * float64(s.Hydrated) / float64(s.Regions)
	}
	str := fmt.Sprintf("%s %d/%d regions (%.1f%%), %d B copied, %d B skipped, %.1f MB/s, ETA %s",
		s.State, s.Hydrated, s.Regions, pct, s.BytesCopied, s.BytesSkipped, s.Rate/1e6, s.ETA.Round(time.Second))
	if s.Window > 0 {
		str += fmt.Sprintf(", window %d KiB (%d KiB in flight)", s.Window>>10, s.InFlightBytes>>10)
	}
	if s.SourceRate > 0 {
		str += fmt.Sprintf(", source %.1f MB/s at %v", s.SourceRate/1e6, s.SourceLatency.Round(time.Microsecond))
	}
	if s.LastError != nil {
		str += fmt.Sprintf(", %d errors, last: %v", s.Errors, s.LastError)
	}
	return str
}

// hydratedBytes approximates the hydrated bytes (the last region may be
// short).
func (h *hydrator) hydratedBytes() int64 {
	return min(int64(h.c.md.hydratedCount())*h.c.geo.RegionSize, h.c.size)
}

// Status returns the current hydration status.
func (c *Clone) Status() Status {
	h := c.hyd
	hyd := c.md.hydratedCount()
	h.mu.Lock()
	defer h.mu.Unlock()
	s := Status{
		RegionSize: c.geo.RegionSize, Regions: c.geo.Regions, Hydrated: hyd,
		InFlight: h.inflight, Threshold: h.threshold,
		InFlightBytes: h.inflightBytes, Window: h.pace.window(h.yielding()),
		SourceRate: h.pace.rate(), SourceLatency: h.pace.latency(),
		BytesCopied: h.copied.Load(), BytesSkipped: h.skipped.Load(),
		Errors: h.errs, LastError: h.lastErr,
		Commits: c.md.commits.Load(), MetadataError: c.md.lastErr(),
	}
	if l := h.lim.Limit(); l != rate.Inf {
		s.RateLimit = int64(l)
	}
	switch {
	case hyd == c.geo.Regions:
		s.State = Hydrated
	case h.closed || c.closed.Load():
		s.State = Closed
	case h.paused:
		s.State = Paused
	case h.failures > 0:
		s.State = Retrying
	default:
		s.State = Hydrating
	}
	if el := time.Since(h.rateMark).Seconds(); el > 0 && s.State == Hydrating {
		done := min(int64(hyd)*c.geo.RegionSize, c.size)
		s.Rate = float64(done-h.rateBytes) / el
		if s.Rate > 0 {
			s.ETA = time.Duration(float64(c.size-done) / s.Rate * float64(time.Second))
		}
	}
	return s
}

// report calls the progress callback when the state changed or the
// interval passed. Only the dispatcher calls it.
func (h *hydrator) report() {
	f := h.c.opts.Progress
	if f == nil {
		return
	}
	s := h.c.Status()
	h.mu.Lock()
	due := s.State != h.lastState || time.Since(h.reported) >= h.c.opts.ProgressInterval
	if due {
		h.lastState, h.reported = s.State, time.Now()
	}
	h.mu.Unlock()
	if due {
		f(s)
	}
}

// finish marks the hydrator stopped (Close) and reports it.
func (h *hydrator) finish() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	if f := h.c.opts.Progress; f != nil {
		f(h.c.Status())
	}
}

func isNotSupported(err error) bool { return errors.Is(err, blockdev.ErrNotSupported) }
