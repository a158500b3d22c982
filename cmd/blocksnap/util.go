package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// parseSize reads a byte count: a number with an optional suffix K, M, G
// or T (powers of 1024; "KiB", "KB" and "k" are accepted alike).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	lower := strings.ToLower(t)
	for _, suf := range []struct {
		s string
		m int64
	}{{"tib", 1 << 40}, {"gib", 1 << 30}, {"mib", 1 << 20}, {"kib", 1 << 10},
		{"tb", 1 << 40}, {"gb", 1 << 30}, {"mb", 1 << 20}, {"kb", 1 << 10},
		{"t", 1 << 40}, {"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"b", 1}} {
		if strings.HasSuffix(lower, suf.s) {
			mult, t = suf.m, t[:len(t)-len(suf.s)]
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil || n < 0 || (n > 0 && mult > (1<<62)/n) {
		return 0, fmt.Errorf("bad size %q: want a number with an optional K, M, G or T suffix", s)
	}
	return n * mult, nil
}

// sizeFlag is a flag.Value holding a byte count.
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

// human formats a byte count with a binary unit.
func human(n int64) string {
	const units = "KMGTPE"
	if n < 1024 && n > -1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/1024, 0
	for (v >= 1024 || v <= -1024) && i < len(units)-1 {
		v /= 1024
		i++
	}
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d %ciB", int64(v), units[i])
	}
	return fmt.Sprintf("%.1f %ciB", v, units[i])
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// progress draws one self-overwriting status line on a terminal, at most
// every 200 ms; it draws nothing when the stream is not a terminal.
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
	return &progress{w: e.stderr, on: e.tty, what: what, start: time.Now()}
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
