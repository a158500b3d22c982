package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/docker/go-units"
)

// sizeSyntax is a byte count: a decimal number, then optionally a unit
// letter (K, M, G, T, P: powers of 1024) with or without "iB" or "B".
var sizeSyntax = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?) ?([kKmMgGtTpP]?)(?:[iI]?[bB])?$`)

// parseSize reads a byte count: 4096, 64K, 64KiB, 1.5GiB, 2T. A value
// that is not a whole number of bytes (1.3KiB) is refused, not rounded.
func parseSize(s string) (int64, error) {
	m := sizeSyntax.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("bad size %q: want a number with an optional unit (4096, 64KiB, 1.5GiB)", s)
	}
	r, ok := new(big.Rat).SetString(m[1])
	if !ok {
		return 0, fmt.Errorf("bad size %q", s)
	}
	shift := uint(0) // bytes
	if m[2] != "" {
		shift = 10 * uint(strings.Index("KMGTP", strings.ToUpper(m[2]))+1)
	}
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
	switch {
	case !r.IsInt():
		return 0, fmt.Errorf("bad size %q: not a whole number of bytes", s)
	case !r.Num().IsInt64() || r.Num().Int64() > 1<<62:
		return 0, fmt.Errorf("bad size %q: too large", s)
	}
	return r.Num().Int64(), nil
}

// sizeFlag is a pflag.Value holding a byte count.
type sizeFlag struct {
	n   int64
	set bool
}

func (f *sizeFlag) String() string {
	if f == nil || !f.set {
		return ""
	}
	return human(f.n)
}

func (f *sizeFlag) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	f.n, f.set = n, true
	return nil
}

func (f *sizeFlag) Type() string { return "SIZE" }

// human formats a byte count with a binary unit: 4KiB, 1.5GiB, 512B.
func human(n int64) string {
	if n < 0 {
		return "-" + units.BytesSize(float64(-n))
	}
	return units.BytesSize(float64(n))
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// progress draws one self-overwriting status line on stderr, at most
// every 200 ms, when env.progress is on; otherwise nothing.
type progress struct {
	w     io.Writer
	on    bool
	what  string
	start time.Time

	mu    sync.Mutex // guards last and drawn; callbacks may come from other goroutines
	last  time.Time
	drawn bool
}

func newProgress(e *env, what string) *progress {
	return &progress{w: e.stderr, on: e.progress, what: what, start: time.Now()}
}

// update shows done of total bytes (total 0: unknown).
func (p *progress) update(done, total int64) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if now.Sub(p.last) < 200*time.Millisecond {
		return
	}
	p.last, p.drawn = now, true
	rate := float64(done) / max(now.Sub(p.start).Seconds(), 1e-3)
	line := fmt.Sprintf("%s: %s", p.what, human(done))
	if total > 0 {
		line += fmt.Sprintf(" / %s (%d%%)", human(total), done*100/total)
	}
	line += fmt.Sprintf(", %s/s", human(int64(rate)))
	fmt.Fprintf(p.w, "\r\033[K%s", line)
}

// text shows a free-form status line.
func (p *progress) text(s string) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drawn = true
	fmt.Fprintf(p.w, "\r\033[K%s: %s", p.what, s)
}

// done ends the status line.
func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}
