package diffstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// StateSuffix is appended to a target's path to name its state file.
const StateSuffix = ".bsstate"

// DefaultStatePath is the state file Apply keeps beside target (a path).
func DefaultStatePath(target string) string { return target + StateSuffix }

// State is what a target holds, as the state file beside it records.
// The file is small JSON, written whole to a temporary file, synced and
// renamed over the old one, so it is always either the old or the new
// state. A missing file is the zero State (nothing known).
//
// Invariant: when the file says Partial with Records = k, records [0, k)
// of that stream are durable on the target (the target was flushed before
// the file was written); records from k on may be partly there. Records
// are absolute writes, so applying them again from k is safe.
type State struct {
	Format string `json:"format"`
	// VolumeSize is the target's size in bytes when the state was written.
	VolumeSize int64 `json:"volume_size"`
	// At is the snapshot the target equals, when it equals one.
	At *Identity `json:"at,omitempty"`
	// Partial is set while a stream is being applied (or was interrupted).
	Partial *Partial `json:"partial,omitempty"`
}

// Partial is a stream applied up to (not including) record Records.
type Partial struct {
	From    Identity `json:"from"`
	To      Identity `json:"to"`
	Records int64    `json:"records"`
}

const stateFormat = "blocksnap-diff-apply-state/1"

func (s State) String() string {
	switch {
	case s.Partial != nil:
		from := s.Partial.From.String()
		if s.Partial.From.ID == "" {
			from = "(full)"
		}
		return fmt.Sprintf("partially applied %s -> %s up to record %d", from, s.Partial.To, s.Partial.Records)
	case s.At != nil:
		return "at " + s.At.String()
	}
	return "unknown (no state recorded)"
}

// ReadState reads the state file at path. A missing file is the zero
// State and no error.
func ReadState(path string) (State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return State{}, nil
	}
	if err != nil {
		return State{}, fmt.Errorf("diffstream: state file: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("diffstream: state file %s: %w: %v", path, ErrCorrupt, err)
	}
	if s.Format != stateFormat {
		return State{}, fmt.Errorf("diffstream: state file %s: %w: format %q, want %q", path, ErrCorrupt, s.Format, stateFormat)
	}
	if s.Partial != nil && s.Partial.Records < 0 {
		return State{}, fmt.Errorf("diffstream: state file %s: %w: negative record count", path, ErrCorrupt)
	}
	return s, nil
}

// WriteState replaces the state file at path atomically and durably.
func WriteState(path string, s State) error {
	s.Format = stateFormat
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("diffstream: state file: %w", err)
	}
	b = append(b, '\n')
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("diffstream: state file: %w", err)
	}
	_, werr := f.Write(b)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp, path)
	}
	if werr != nil {
		os.Remove(tmp)
		return fmt.Errorf("diffstream: state file: %w", werr)
	}
	// Make the rename durable; a directory that cannot be synced (some
	// filesystems) still has the rename, so that error is not fatal.
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
