package blockdev_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

const testSize = 8 << 20

func memDevice(t *testing.T) blockdev.Device {
	m, err := blockdev.NewMem(testSize, 512)
	require.NoError(t, err)
	return m
}

func newFile(t *testing.T, opts blockdev.FileOptions) blockdev.Device {
	f, err := blockdev.Create(filepath.Join(t.TempDir(), "dev"), testSize, opts)
	if opts.Direct && errors.Is(err, blockdev.ErrNotSupported) {
		t.Skipf("O_DIRECT not supported here: %v", err)
	}
	require.NoError(t, err)
	return f
}

func TestConformanceMem(t *testing.T) { blockdevtest.Run(t, memDevice) }

func TestConformanceMem4K(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		m, err := blockdev.NewMem(testSize, 4096)
		require.NoError(t, err)
		return m
	})
}

func TestConformanceFile(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device { return newFile(t, blockdev.FileOptions{}) })
}

func TestConformanceFile512(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device { return newFile(t, blockdev.FileOptions{BlockSize: 512}) })
}

func TestConformanceFileDirect(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device { return newFile(t, blockdev.FileOptions{Direct: true}) })
}

func TestConformanceSlice(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		parent := memDevice(t)
		s, err := blockdev.Slice(parent, 1<<20, 4<<20)
		require.NoError(t, err)
		return s
	})
}

func TestConformanceReadOnly(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		parent := memDevice(t)
		_, err := parent.WriteAt([]byte(strings.Repeat("x", 4096)), 0)
		require.NoError(t, err)
		return blockdev.ReadOnly(parent)
	})
}

func TestConformanceReadOnlyFile(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		path := filepath.Join(t.TempDir(), "ro")
		require.NoError(t, os.WriteFile(path, make([]byte, testSize), 0o644))
		f, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true})
		require.NoError(t, err)
		return f
	})
}

// TestConformanceLoopDevice runs the suite on a File opened on a loop device
// over a temporary file: the block-device-node paths (BLKGETSIZE64,
// BLKSSZGET, fallocate on the node).
func TestConformanceLoopDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not installed")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("no loop devices here")
	}
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		backing := filepath.Join(t.TempDir(), "backing")
		require.NoError(t, os.WriteFile(backing, nil, 0o644))
		require.NoError(t, os.Truncate(backing, testSize))
		out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
		if err != nil {
			t.Skipf("losetup refused: %v: %s", err, out)
		}
		loop := strings.TrimSpace(string(out))
		t.Cleanup(func() { _ = exec.Command("losetup", "-d", loop).Run() })
		f, err := blockdev.Open(loop, blockdev.FileOptions{})
		require.NoError(t, err)
		require.Equal(t, int64(testSize), f.Size())
		return f
	})
}

func TestSliceBounds(t *testing.T) {
	m := memDevice(t)
	_, err := blockdev.Slice(m, 1, 4096)
	require.ErrorIs(t, err, blockdev.ErrMisaligned)
	_, err = blockdev.Slice(m, testSize-4096, 8192)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	s, err := blockdev.Slice(m, 4096, 8192)
	require.NoError(t, err)
	_, err = s.WriteAt(make([]byte, 512), 8192)
	require.ErrorIs(t, err, blockdev.ErrOutOfRange)
	// Writes land at the slice's offset in the parent.
	_, err = s.WriteAt([]byte(strings.Repeat("s", 512)), 512)
	require.NoError(t, err)
	p := make([]byte, 512)
	_, err = m.ReadAt(p, 4096+512)
	require.NoError(t, err)
	require.Equal(t, strings.Repeat("s", 512), string(p))
	require.NoError(t, s.Close())
	_, err = m.ReadAt(p, 0)
	require.NoError(t, err, "closing a slice must not close its parent")
}

func TestMemSparse(t *testing.T) {
	m, err := blockdev.NewMem(1<<40, 4096) // 1 TiB
	require.NoError(t, err)
	_, err = m.WriteAt(make([]byte, 8192), 1<<39)
	require.NoError(t, err)
	require.Equal(t, int64(8192), m.Allocated())
	n, state, err := m.MapAllocation(0, 1<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Hole, state)
	require.Equal(t, int64(1<<20), n)
	n, state, err = m.MapAllocation(1<<39, 1<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, state)
	require.Equal(t, int64(8192), n)
	require.NoError(t, m.Discard(1<<39, 8192))
	require.Equal(t, int64(0), m.Allocated())
}

func TestFileHoles(t *testing.T) {
	f := newFile(t, blockdev.FileOptions{}).(*blockdev.File)
	defer f.Close()
	_, err := f.WriteAt(make([]byte, 64<<10), 1<<20)
	require.NoError(t, err)
	n, state, err := f.MapAllocation(0, 2<<20)
	require.NoError(t, err)
	if state == blockdev.Allocated {
		t.Skip("file system does not report holes")
	}
	require.Equal(t, int64(1<<20), n)
	n, state, err = f.MapAllocation(1<<20, 1<<20)
	require.NoError(t, err)
	require.Equal(t, blockdev.Allocated, state)
	require.Equal(t, int64(64<<10), n)
}

func TestOpenErrors(t *testing.T) {
	_, err := blockdev.Open(filepath.Join(t.TempDir(), "missing"), blockdev.FileOptions{})
	require.ErrorIs(t, err, os.ErrNotExist)
	_, err = blockdev.Open(t.TempDir(), blockdev.FileOptions{ReadOnly: true})
	require.ErrorIs(t, err, blockdev.ErrNotSupported)
	_, err = blockdev.Create(filepath.Join(t.TempDir(), "x"), 1000, blockdev.FileOptions{})
	require.ErrorIs(t, err, blockdev.ErrMisaligned)
	_, err = blockdev.NewMem(4096, 1024)
	require.ErrorIs(t, err, blockdev.ErrNotSupported)
	f := newFile(t, blockdev.FileOptions{})
	require.NoError(t, f.Close())
	require.ErrorIs(t, f.Close(), blockdev.ErrClosed)
}

func TestFileReopenKeepsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	f, err := blockdev.Create(path, 1<<20, blockdev.FileOptions{})
	require.NoError(t, err)
	_, err = f.WriteAt([]byte(strings.Repeat("k", 4096)), 8192)
	require.NoError(t, err)
	require.NoError(t, f.Flush())
	require.NoError(t, f.Close())
	g, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true})
	require.NoError(t, err)
	defer g.Close()
	p := make([]byte, 4096)
	_, err = g.ReadAt(p, 8192)
	require.NoError(t, err)
	require.Equal(t, strings.Repeat("k", 4096), string(p))
	_, err = g.WriteAt(p, 0)
	require.ErrorIs(t, err, blockdev.ErrReadOnly)
}
