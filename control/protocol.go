package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// Op names an operation.
type Op string

// Operations of `blocksnap serve` (a snapshot store).
const (
	OpInfo       Op = "info"        // who is serving: Info
	OpList       Op = "list"        // []Volume
	OpStat       Op = "stat"        // Name: VolumeStat
	OpUsage      Op = "usage"       // Space
	OpSnapshot   Op = "snapshot"    // Name, Of (default "origin"): Volume
	OpClone      Op = "clone"       // Name, From: Volume
	OpDelete     Op = "delete"      // Name, Wait, Force, Recursive: DeleteResult
	OpRename     Op = "rename"      // Name, NewName: Volume
	OpRollback   Op = "rollback"    // Name, To: Volume
	OpDiff       Op = "diff"        // From, To (default: the live volume From was taken of): Diff
	OpExportDiff Op = "export-diff" // To, From (empty: full): a diff stream
	OpCheck      Op = "check"       // CheckReport
	OpDump       Op = "dump"        // Dump
	OpProtect    Op = "protect"     // Name: Volume
	OpUnprotect  Op = "unprotect"   // Name: Volume
	OpGrow       Op = "grow"        // GrowResult
	OpCreate     Op = "create"      // Name, Size: Volume (a blank volume)
	OpResize     Op = "resize"      // Name, Size, Shrink: Volume
	OpImport     Op = "import"      // Name, Source (a path or nbd:// URI the server opens): Volume
)

// Operations of `blocksnap hydrate` (a clone).
const (
	OpStatus  Op = "status"   // CloneStatus
	OpPause   Op = "pause"    // CloneStatus
	OpResume  Op = "resume"   // CloneStatus
	OpSetRate Op = "set-rate" // Rate: CloneStatus
)

// MaxLine is the longest request line a server reads, newline included.
// Answers may be longer (a diff or a dump of a large store).
const MaxLine = 64 << 10

// MaxName is the longest volume name a request may carry (the store's own
// limit may be lower; it answers with an error then).
const MaxName = 1024

// Request is one operation. Which fields an operation reads is listed at
// its Op constant and in docs/control.md; DecodeRequest refuses a request
// that lacks one it needs.
type Request struct {
	Op      Op     `json:"op"`
	Name    string `json:"name,omitempty"`     // the volume acted on
	Of      string `json:"of,omitempty"`       // snapshot: the volume to snapshot
	From    string `json:"from,omitempty"`     // clone: the snapshot; diff, export-diff: the older side
	To      string `json:"to,omitempty"`       // rollback: the snapshot; diff, export-diff: the newer side
	NewName string `json:"new_name,omitempty"` // rename
	// Wait: delete answers once the volume's space is reclaimed.
	Wait bool `json:"wait,omitempty"`
	// Force: delete a volume that NBD clients are connected to, closing
	// their connections (without it a serve refuses, CodeBusy).
	Force bool `json:"force,omitempty"`
	// Recursive: delete also the volumes that depend on Name (the clones
	// of a snapshot, their snapshots and clones), deepest first.
	Recursive bool `json:"recursive,omitempty"`
	// Detach: a snapshot that clones depend on goes as a hidden parent
	// point that they keep (without it, or Recursive, such a delete is
	// refused, CodeInvalid).
	Detach bool `json:"detach,omitempty"`
	// Compress: export-diff writes a zstd-compressed stream (version 2).
	Compress bool `json:"compress,omitempty"`
	// Rate is set-rate's cap on background hydration in bytes per
	// second; 0 removes the cap.
	Rate int64 `json:"rate,omitempty"`
	// Size is create's and resize's volume size in bytes.
	Size int64 `json:"size,omitempty"`
	// Shrink: resize may make the volume smaller, discarding its tail.
	Shrink bool `json:"shrink,omitempty"`
	// Source is import's source: a path on the server's machine (an
	// absolute one) or an nbd:// URI.
	Source string `json:"source,omitempty"`
	// Metadata is grow's bytes to add to the metadata region (taken from
	// the free data space); 0 grows only the data region.
	Metadata int64 `json:"metadata,omitempty"`
}

// Response is one answer line. A failed request has OK false and Error a
// one-line message (Code classifies it); a successful one carries Result,
// whose type depends on the operation. An export-diff answer is a Response
// with OK true and no Result, followed on the connection by the diff
// stream, after which the server closes the connection.
type Response struct {
	OK     bool            `json:"ok"`
	Code   Code            `json:"code,omitempty"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

// Code classifies a failed request.
type Code string

// Codes a server answers with.
const (
	CodeBadRequest Code = "bad-request" // the request did not decode or validate
	CodeNotFound   Code = "not-found"   // no such volume
	CodeExists     Code = "exists"      // the name is taken
	CodeInvalid    Code = "invalid"     // the operation does not apply (a live volume as a diff end, the origin deleted)
	CodeNoSpace    Code = "no-space"    // the store is full
	CodeBusy       Code = "busy"        // the volume is in use (NBD clients connected to it)
	CodeFailed     Code = "failed"      // anything else
)

// RequestError is a request DecodeRequest refused.
type RequestError struct {
	Reason string
}

func (e *RequestError) Error() string { return "bad request: " + e.Reason }

// Error is a failure the server answered with.
type Error struct {
	Op      Op
	Code    Code
	Message string
}

func (e *Error) Error() string { return e.Message }

// Is makes errors.Is(err, ErrNotFound) and the like work on answers.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Code == CodeNotFound
	case ErrExists:
		return e.Code == CodeExists
	case ErrNoSpace:
		return e.Code == CodeNoSpace
	case ErrBusy:
		return e.Code == CodeBusy
	}
	return false
}

// Sentinels an answer's Error matches with errors.Is.
var (
	ErrNotFound = errors.New("control: no such volume")
	ErrExists   = errors.New("control: name already in use")
	ErrNoSpace  = errors.New("control: store is full")
	ErrBusy     = errors.New("control: volume is in use")
	// ErrNoServer: nothing answers at the socket's path.
	ErrNoServer = errors.New("no control socket answers")
	// ErrBadAnswer: the server's answer did not decode.
	ErrBadAnswer = errors.New("control: bad answer")
)

// needs lists the fields each operation requires.
var needs = map[Op][]string{
	OpInfo: nil, OpList: nil, OpUsage: nil, OpCheck: nil, OpDump: nil,
	OpStat:       {"name"},
	OpSnapshot:   {"name"},
	OpClone:      {"name", "from"},
	OpDelete:     {"name"},
	OpRename:     {"name", "new_name"},
	OpRollback:   {"name", "to"},
	OpProtect:    {"name"},
	OpGrow:       nil,
	OpCreate:     {"name"},
	OpResize:     {"name"},
	OpImport:     {"name", "source"},
	OpUnprotect:  {"name"},
	OpDiff:       {"from"},
	OpExportDiff: {"to"},
	OpStatus:     nil, OpPause: nil, OpResume: nil, OpSetRate: nil,
}

// Known reports whether op is an operation of this protocol.
func Known(op Op) bool {
	_, ok := needs[op]
	return ok
}

// DecodeRequest decodes and validates one request line (without or with
// its newline). Anything but a well-formed request of a known operation,
// with the fields that operation needs, is a *RequestError: unknown
// fields, trailing data, names that are empty, too long, not UTF-8 or
// holding control characters, a negative rate.
func DecodeRequest(line []byte) (Request, error) {
	var r Request
	line = bytes.TrimSuffix(line, []byte("\n"))
	if len(line) >= MaxLine {
		return r, &RequestError{Reason: fmt.Sprintf("request of %d bytes exceeds %d", len(line), MaxLine-1)}
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Request{}, &RequestError{Reason: oneLine(err.Error())}
	}
	if dec.More() {
		return Request{}, &RequestError{Reason: "data after the request object"}
	}
	if err := r.Validate(); err != nil {
		return Request{}, err
	}
	return r, nil
}

// Validate checks r as DecodeRequest does.
func (r Request) Validate() error {
	need, ok := needs[r.Op]
	if !ok {
		return &RequestError{Reason: fmt.Sprintf("unknown operation %q", truncate(string(r.Op)))}
	}
	fields := map[string]string{"name": r.Name, "of": r.Of, "from": r.From, "to": r.To, "new_name": r.NewName, "source": r.Source}
	for _, f := range need {
		if fields[f] == "" {
			return &RequestError{Reason: fmt.Sprintf("%s needs %q", r.Op, f)}
		}
	}
	for _, f := range []string{"name", "of", "from", "to", "new_name", "source"} {
		if err := checkName(f, fields[f]); err != nil {
			return err
		}
	}
	if r.Rate < 0 {
		return &RequestError{Reason: fmt.Sprintf("negative rate %d", r.Rate)}
	}
	if (r.Op == OpCreate || r.Op == OpResize) && r.Size <= 0 {
		return &RequestError{Reason: fmt.Sprintf("%s needs a positive size, not %d", r.Op, r.Size)}
	}
	if r.Metadata < 0 {
		return &RequestError{Reason: fmt.Sprintf("negative metadata size %d", r.Metadata)}
	}
	return nil
}

func checkName(field, s string) error {
	switch {
	case len(s) > MaxName:
		return &RequestError{Reason: fmt.Sprintf("%s of %d bytes exceeds %d", field, len(s), MaxName)}
	case !utf8.ValidString(s):
		return &RequestError{Reason: field + " is not UTF-8"}
	case strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return &RequestError{Reason: field + " holds a control character"}
	}
	return nil
}

// DecodeResponse decodes one answer line. A line that is not a response
// object, or a failed response without a message, is ErrBadAnswer.
func DecodeResponse(line []byte) (Response, error) {
	var r Response
	if err := json.Unmarshal(line, &r); err != nil {
		return Response{}, fmt.Errorf("%w: %s", ErrBadAnswer, oneLine(err.Error()))
	}
	if !r.OK && r.Error == "" {
		return Response{}, fmt.Errorf("%w: a failure without a message", ErrBadAnswer)
	}
	return r, nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// oneLine folds a message onto one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ")), " ")
}

// Volume is a volume of a store.
type Volume struct {
	ID       uint64    `json:"id"`
	Name     string    `json:"name"`
	UUID     string    `json:"uuid,omitempty"` // the volume's stable identity
	Kind     string    `json:"kind"`           // origin, snapshot, clone, volume (blank or imported)
	Parent   string    `json:"parent,omitempty"`
	ParentID uint64    `json:"parent_id,omitempty"`
	Created  time.Time `json:"created"`
	Size     int64     `json:"size"` // bytes
	// Hidden: a snapshot kept only as the parent point of clones (no
	// name; list shows it so that every parent_id is in the list).
	Hidden bool `json:"hidden,omitempty"`
	// Protected: delete refuses the volume until unprotect.
	Protected bool `json:"protected,omitempty"`
	// Children are the IDs of the volumes whose parent this is (list).
	Children []uint64 `json:"children,omitempty"`
}

// VolumeStat is a volume's space accounting, in bytes of store space.
type VolumeStat struct {
	Volume
	Mapped    int64 `json:"mapped"`
	Exclusive int64 `json:"exclusive"`
	Shared    int64 `json:"shared"`
}

// GrowResult is what grow did: the data bytes it added (0 when the store
// device has not grown since the store was opened) and the data region's
// size now.
type GrowResult struct {
	Added     int64 `json:"added"`
	DataBytes int64 `json:"data_bytes"`
	// MetadataAdded is what grow --metadata added to the metadata region,
	// and MetadataBytes the region's size now.
	MetadataAdded int64 `json:"metadata_added"`
	MetadataBytes int64 `json:"metadata_bytes"`
}

// DeleteResult is what delete did.
type DeleteResult struct {
	Deleted string `json:"deleted"`
	// Dependants are the volumes a recursive delete deleted first.
	Dependants []string `json:"dependants,omitempty"`
	// Reclaimed is the store space freed, when the request waited for it.
	Reclaimed int64 `json:"reclaimed,omitempty"`
	Waited    bool  `json:"waited"`
}

// Extent is a byte range of a volume; Zero: it reads as zeros.
type Extent struct {
	Off  int64 `json:"off"`
	Len  int64 `json:"len"`
	Zero bool  `json:"zero,omitempty"`
}

// Diff is the extents that differ between two volumes.
type Diff struct {
	From    string   `json:"from"`
	To      string   `json:"to"`
	Extents []Extent `json:"extents"`
	Bytes   int64    `json:"bytes"`
}

// CheckReport is the result of a metadata check: OK only when Problems is
// empty.
type CheckReport struct {
	OK       bool     `json:"ok"`
	Target   string   `json:"target"` // what was checked: a store, a clone, a COW device
	Engine   string   `json:"engine"` // snapshot, clone, exception
	Volumes  int      `json:"volumes,omitempty"`
	Problems []string `json:"problems,omitempty"`
	// Live: the check ran on a running server's state.
	Live bool `json:"live,omitempty"`
}

// Space is a store's space summary: the data region, the metadata region
// and the journal, in bytes (as snapshot.Stats).
type Space struct {
	ChunkSize     int64   `json:"chunk_size"`
	DataBytes     int64   `json:"data_bytes"`
	UsedBytes     int64   `json:"used_bytes"`
	FreeBytes     int64   `json:"free_bytes"`
	IndexEntries  int64   `json:"index_entries"`
	MetadataBytes int64   `json:"metadata_bytes"`
	JournalFill   float64 `json:"journal_fill"`
	// MetadataRegion is the metadata region's size (MetadataBytes of it
	// in use).
	MetadataRegion int64 `json:"metadata_region"`
	// SpaceMapMemory is the memory the store's space maps take now, in
	// bytes (snapshot.Stats.SpaceMapMemory): at most one bit per data
	// chunk, next to none where the store is all used or all free, and at
	// most an eighth of the metadata cache for the data map, whose bitmap
	// pages are paged out past it; SpaceMapReads counts those read back
	// since the store was opened.
	SpaceMapMemory int64 `json:"space_map_memory"`
	SpaceMapReads  int64 `json:"space_map_reads"`
}

// DumpVolume is a volume in a Dump: its accounting and the extents where
// it differs from the volume it is compared with (Against): for a
// snapshot the live volume it was taken of, for a clone the snapshot it
// was cloned from. Those are the chunks it holds in the store for itself.
type DumpVolume struct {
	VolumeStat
	Against string   `json:"against,omitempty"`
	Extents []Extent `json:"extents,omitempty"`
}

// Dump is a store's metadata as the public API shows it.
type Dump struct {
	Origin     string       `json:"origin"`
	OriginSize int64        `json:"origin_size"`
	Store      string       `json:"store"`
	StoreSize  int64        `json:"store_size"`
	BlockSize  int          `json:"block_size"`
	Space      Space        `json:"space"`
	Volumes    []DumpVolume `json:"volumes"`
	Check      CheckReport  `json:"check"`
}

// Info names the process answering on a socket.
type Info struct {
	Program string    `json:"program"` // "blocksnap serve", "blocksnap hydrate"
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Control string    `json:"control"`
	// Store and Origin (serve), Dest and Meta (hydrate): what it holds.
	Store  string `json:"store,omitempty"`
	Origin string `json:"origin,omitempty"`
	Dest   string `json:"dest,omitempty"`
	Meta   string `json:"meta,omitempty"`
	// Listen and Socket are where it serves NBD, Metrics its Prometheus
	// metrics (HTTP, /metrics).
	Listen  string `json:"listen,omitempty"`
	Socket  string `json:"socket,omitempty"`
	Metrics string `json:"metrics,omitempty"`
}

// CloneStatus is a clone's hydration status.
type CloneStatus struct {
	State         string  `json:"state"` // hydrating, paused, hydrated, stopped (no process holds it)
	RegionSize    int64   `json:"region_size"`
	Regions       uint64  `json:"regions"`
	Hydrated      uint64  `json:"hydrated"`
	Percent       float64 `json:"percent"`
	InFlight      int     `json:"in_flight"`
	BytesCopied   int64   `json:"bytes_copied"`
	BytesSkipped  int64   `json:"bytes_skipped"`
	Rate          float64 `json:"rate"`     // bytes per second, measured
	RateLimit     int64   `json:"rate_cap"` // bytes per second; 0: no cap
	ETASeconds    float64 `json:"eta_seconds"`
	Errors        int64   `json:"errors"`
	LastError     string  `json:"last_error,omitempty"`
	MetadataError string  `json:"metadata_error,omitempty"`
}
