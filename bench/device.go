package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev"
)

// DeviceFileSize is the file BenchmarkDevice writes into: 1 GiB.
const DeviceFileSize = 1 << 30

// Backends are the BenchmarkDevice backends, in report order.
var Backends = []string{"pread", "pread-direct", "uring", "uring-direct"}

// Device measures 4 KiB random writes to a 1 GiB file with qd requests in
// flight (qd goroutines) on the named backend: iops, p50-ns, p99-ns.
func Device(b *testing.B, env Env, backend string, qd int) {
	e := env
	switch backend {
	case "pread", "uring":
		e.Backend, e.Direct = backend, false
	case "pread-direct":
		e.Backend, e.Direct = "pread", true
	case "uring-direct":
		e.Backend, e.Direct = "uring", true
	default:
		b.Fatalf("unknown backend %q", backend)
	}
	dev, err := openDeviceFile(e)
	if err != nil {
		b.Skipf("backend %s unavailable: %v", backend, err)
	}
	defer dev.Close()
	randomIO(b, qd, DeviceFileSize/BlockSize, 42, func(buf []byte, blk int64) error {
		_, err := dev.WriteAt(buf, blk*BlockSize)
		return err
	})
}

// deviceFile is the 1 GiB file every BenchmarkDevice run writes into,
// created and fully allocated once per process (allocating it takes longer
// than the measurement) and removed by Cleanup.
var deviceFile struct {
	once sync.Once
	dir  string
	err  error
}

// openDeviceFile opens the shared benchmark file (or, with a raw device,
// the first GiB of it) with env's backend.
func openDeviceFile(env Env) (blockdev.Device, error) {
	var p Pool
	p.env = env
	if env.Device != "" {
		if !env.Destructive {
			return nil, fmt.Errorf("bench: set BLOCKSNAP_BENCH_DESTRUCTIVE=1 to write %s", env.Device)
		}
		raw, err := p.open(env.Device)
		if err != nil {
			return nil, err
		}
		return blockdev.Slice(raw, 0, DeviceFileSize)
	}
	deviceFile.once.Do(func() {
		dir, err := os.MkdirTemp(env.Dir, "blocksnap-bench-device-")
		if err != nil {
			deviceFile.err = err
			return
		}
		deviceFile.dir = dir
		f, err := blockdev.Create(filepath.Join(dir, "device.img"), DeviceFileSize, blockdev.FileOptions{})
		if err != nil {
			deviceFile.err = err
			return
		}
		defer f.Close()
		// Allocate every block so the timed writes measure overwrites,
		// not the file system's block allocation.
		deviceFile.err = prefill(f, DeviceFileSize)
	})
	if deviceFile.err != nil {
		return nil, deviceFile.err
	}
	return p.open(filepath.Join(deviceFile.dir, "device.img"))
}

// Cleanup removes files shared between benchmark runs of this process.
func Cleanup() {
	if deviceFile.dir != "" {
		os.RemoveAll(deviceFile.dir)
	}
}
