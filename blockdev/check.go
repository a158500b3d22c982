package blockdev

import (
	"fmt"
	"strings"
)

// CheckReport collects every problem a consistency check finds (an engine's
// metadata check, in the manner of thin_check or bbolt's Tx.Check), so that
// a tool can list them all rather than the first. Each problem is one line
// saying what is wrong and where.
type CheckReport struct {
	Problems []string `json:"problems"`
}

// Addf records one problem.
func (r *CheckReport) Addf(format string, args ...any) {
	r.Problems = append(r.Problems, fmt.Sprintf(format, args...))
}

// OK reports whether the check found nothing wrong.
func (r CheckReport) OK() bool { return len(r.Problems) == 0 }

// Err returns nil for a clean report, otherwise a *CheckError holding every
// problem and wrapping kind (the engine's ErrCorrupt).
func (r CheckReport) Err(kind error) error {
	if r.OK() {
		return nil
	}
	return &CheckError{Problems: r.Problems, Kind: kind}
}

// CheckError is a failed consistency check. Its message names the first
// few problems; Problems holds all of them.
type CheckError struct {
	Problems []string
	Kind     error
}

// checkErrorShown bounds the problems an error message quotes.
const checkErrorShown = 5

func (e *CheckError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v: %d problem", e.Kind, len(e.Problems))
	if len(e.Problems) != 1 {
		b.WriteString("s")
	}
	for i, p := range e.Problems[:min(len(e.Problems), checkErrorShown)] {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(p)
	}
	if n := len(e.Problems) - checkErrorShown; n > 0 {
		fmt.Fprintf(&b, "; and %d more", n)
	}
	return b.String()
}

// Unwrap makes errors.Is(err, kind) hold.
func (e *CheckError) Unwrap() error { return e.Kind }
