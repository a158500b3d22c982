// Package bench holds blocksnap's benchmarks: the bodies live here, in
// ordinary code, so that both `go test -bench` (bench_test.go) and the
// report command (bench/cmd/report, through testing.Benchmark) run exactly
// the same measurements. Names and parameters are listed in the README's Benchmarks section.
//
// Where the devices come from:
//
//   - default: sparse temporary files under os.TempDir();
//   - BLOCKSNAP_BENCH_DIR=/mnt/fast: temporary files there instead;
//   - BLOCKSNAP_BENCH_DEVICE=/dev/nvme0n1 with BLOCKSNAP_BENCH_DESTRUCTIVE=1:
//     every device a benchmark needs (origin, store, metadata, COW devices)
//     is carved from that raw device with blockdev.Slice; its contents are
//     destroyed;
//   - BLOCKSNAP_BENCH_BACKEND=pread|uring: the backend for file and raw
//     devices (pread is the default);
//   - BLOCKSNAP_BENCH_DIRECT=1: open them with O_DIRECT.
package bench

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Env describes where benchmark devices come from, read from the
// environment by EnvFromOS.
type Env struct {
	Dir         string // directory for temporary files ("" = os.TempDir())
	Device      string // raw device to carve from ("" = files)
	Destructive bool   // the user agreed to destroy Device's contents
	Backend     string // "pread" or "uring"
	Direct      bool   // O_DIRECT
}

// EnvFromOS reads the BLOCKSNAP_BENCH_* variables.
func EnvFromOS() Env {
	e := Env{
		Dir:         os.Getenv("BLOCKSNAP_BENCH_DIR"),
		Device:      os.Getenv("BLOCKSNAP_BENCH_DEVICE"),
		Destructive: os.Getenv("BLOCKSNAP_BENCH_DESTRUCTIVE") == "1",
		Backend:     os.Getenv("BLOCKSNAP_BENCH_BACKEND"),
		Direct:      os.Getenv("BLOCKSNAP_BENCH_DIRECT") == "1",
	}
	if e.Backend == "" {
		e.Backend = "pread"
	}
	return e
}

// Describe says where devices come from, for reports.
func (e Env) Describe() string {
	where := "temporary files in " + e.Dir
	if e.Dir == "" {
		where = "temporary files in " + os.TempDir()
	}
	if e.Device != "" {
		where = "raw device " + e.Device
	}
	direct := ""
	if e.Direct {
		direct = ", O_DIRECT"
	}
	return fmt.Sprintf("%s, backend %s%s", where, e.Backend, direct)
}

// Pool hands out devices for one benchmark run and releases them all on
// Close: temporary files are removed; raw-device slices are just forgotten.
type Pool struct {
	env Env

	mu     sync.Mutex // guards the fields below
	dir    string
	raw    blockdev.Device
	cursor int64
	opened []blockdev.Device
	n      int
}

// NewPool prepares a pool for env. A raw device without Destructive is
// refused.
func NewPool(env Env) (*Pool, error) {
	p := &Pool{env: env}
	if env.Device != "" {
		if !env.Destructive {
			return nil, errors.New("bench: BLOCKSNAP_BENCH_DEVICE destroys the device's contents; set BLOCKSNAP_BENCH_DESTRUCTIVE=1 to agree")
		}
		raw, err := p.open(env.Device)
		if err != nil {
			return nil, err
		}
		p.raw = raw
		return p, nil
	}
	dir, err := os.MkdirTemp(env.Dir, "blocksnap-bench-")
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	p.dir = dir
	return p, nil
}

func (p *Pool) open(path string) (blockdev.Device, error) {
	opts := blockdev.FileOptions{Direct: p.env.Direct}
	switch p.env.Backend {
	case "pread":
		return blockdev.Open(path, opts)
	case "uring":
		return openURing(path, opts)
	}
	return nil, fmt.Errorf("bench: unknown backend %q (pread or uring)", p.env.Backend)
}

// Device returns a new zero-filled device of size bytes named for the
// report (name is only used in file names).
func (p *Pool) Device(name string, size int64) (blockdev.Device, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.raw != nil {
		const align = 1 << 20
		size = (size + align - 1) / align * align
		d, err := blockdev.Slice(p.raw, p.cursor, size)
		if err != nil {
			return nil, fmt.Errorf("bench: %s needs %d bytes at %d of %s: %w", name, size, p.cursor, p.env.Device, err)
		}
		if err := d.Discard(0, size); err != nil {
			return nil, fmt.Errorf("bench: zeroing %s: %w", name, err)
		}
		p.cursor += size
		p.opened = append(p.opened, d)
		return d, nil
	}
	p.n++
	path := filepath.Join(p.dir, fmt.Sprintf("%03d-%s.img", p.n, name))
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	err = errors.Join(f.Truncate(size), f.Close())
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	d, err := p.open(path)
	if err != nil {
		return nil, err
	}
	p.opened = append(p.opened, d)
	return d, nil
}

// Close closes every device and removes temporary files.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range p.opened {
		_ = d.Close() // engines may have closed them already
	}
	p.opened = nil
	if p.raw != nil {
		return p.raw.Close()
	}
	return os.RemoveAll(p.dir)
}

func openURing(path string, opts blockdev.FileOptions) (blockdev.Device, error) {
	return blockdev.OpenURing(path, blockdev.URingOptions{FileOptions: opts, Entries: 256})
}
