package blockdev_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

const uringTestSize = 8 << 20

// createURing makes a URing on a fresh temporary file, skipping the test
// where io_uring (or O_DIRECT) is unavailable; the message says why.
func createURing(t testing.TB, size int64, opts blockdev.URingOptions) *blockdev.URing {
	t.Helper()
	u, err := blockdev.CreateURing(filepath.Join(t.TempDir(), "dev"), size, opts)
	if errors.Is(err, blockdev.ErrNotSupported) {
		t.Skipf("io_uring not usable here: %v", err)
	}
	require.NoError(t, err)
	return u
}

func TestURingConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts blockdev.URingOptions
	}{
		{"buffered", blockdev.URingOptions{}},
		{"direct", blockdev.URingOptions{FileOptions: blockdev.FileOptions{Direct: true}}},
		{"buffered512", blockdev.URingOptions{FileOptions: blockdev.FileOptions{BlockSize: 512}}},
		{"direct512", blockdev.URingOptions{FileOptions: blockdev.FileOptions{Direct: true, BlockSize: 512}}},
		{"queue4", blockdev.URingOptions{Entries: 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
				return createURing(t, uringTestSize, tc.opts)
			})
		})
	}
}

func TestURingConformanceReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	f, err := blockdev.Create(path, uringTestSize, blockdev.FileOptions{})
	require.NoError(t, err)
	require.NoError(t, f.Close())
	blockdevtest.Run(t, func(t *testing.T) blockdev.Device {
		u, err := blockdev.OpenURing(path, blockdev.URingOptions{FileOptions: blockdev.FileOptions{ReadOnly: true, Direct: true}})
		if errors.Is(err, blockdev.ErrNotSupported) {
			t.Skipf("io_uring not usable here: %v", err)
		}
		require.NoError(t, err)
		return u
	})
}

// TestURingManyGoroutines runs many more goroutines than request slots,
// each writing, reading back and discarding its own blocks, while others
// read and flush, and checks every read against a per-goroutine model.
func TestURingManyGoroutines(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			u := createURing(t, uringTestSize, blockdev.URingOptions{
				FileOptions: blockdev.FileOptions{Direct: direct},
				Entries:     8,
			})
			defer func() { require.NoError(t, u.Close()) }()
			const workers, blocksEach, steps = 64, 8, 60
			bs := int64(u.BlockSize())
			seed := blockdevtest.Seed(t)
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- churn(u, seed+uint64(w), int64(w)*blocksEach*bs, blocksEach, steps)
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				require.NoError(t, err, "seed %d", seed)
			}
		})
	}
}

// churn owns blocks [base, base+n*bs) of u and checks them against a model.
func churn(u *blockdev.URing, seed uint64, base int64, n, steps int) error {
	rng := rand.New(rand.NewPCG(seed, 0))
	bs := u.BlockSize()
	model := make([][]byte, n)
	for i := range model {
		model[i] = make([]byte, bs)
		if _, err := u.WriteAt(model[i], base+int64(i*bs)); err != nil {
			return err
		}
	}
	buf := blockdev.AlignedBuffer(bs + 1) // buf[1:] is unaligned: bounced under O_DIRECT
	for step := range steps {
		i := rng.IntN(n)
		off := base + int64(i*bs)
		o := rng.IntN(2)
		p := buf[o : o+bs]
		switch rng.IntN(5) {
		case 0, 1:
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if _, err := u.WriteAt(p, off); err != nil {
				return err
			}
			copy(model[i], p)
		case 2:
			if err := u.Discard(off, int64(bs)); err != nil {
				return err
			}
			clear(model[i])
		case 3:
			if err := u.Flush(); err != nil {
				return err
			}
		default:
			if _, err := u.ReadAt(p, off); err != nil {
				return err
			}
			if string(p) != string(model[i]) {
				return fmt.Errorf("seed %d step %d: block %d differs from the model", seed, step, off/int64(bs))
			}
		}
	}
	return nil
}

// TestURingCloseInFlight closes the device while many goroutines have
// writes in flight: every call returns nil or ErrClosed, Close returns nil,
// and each block then holds the last write that was acknowledged to it.
func TestURingCloseInFlight(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "dev")
			u, err := blockdev.CreateURing(path, uringTestSize, blockdev.URingOptions{
				FileOptions: blockdev.FileOptions{Direct: direct},
				Entries:     16,
			})
			if errors.Is(err, blockdev.ErrNotSupported) {
				t.Skipf("io_uring not usable here: %v", err)
			}
			require.NoError(t, err)
			const workers = 48 // more than the slots: some wait for one
			bs := u.BlockSize()
			acked := make([]uint64, workers)
			errs := make([]error, workers)
			var started, wg sync.WaitGroup
			started.Add(workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := blockdev.AlignedBuffer(bs)
					for seq := uint64(1); ; seq++ {
						binary.LittleEndian.PutUint64(buf, seq)
						if _, err := u.WriteAt(buf, int64(w*bs)); err != nil {
							errs[w] = err
							if seq == 1 {
								started.Done()
							}
							return
						}
						acked[w] = seq
						if seq == 1 {
							started.Done()
						}
					}
				}()
			}
			started.Wait()
			require.NoError(t, u.Close())
			wg.Wait()
			require.ErrorIs(t, u.Close(), blockdev.ErrClosed)
			_, err = u.ReadAt(make([]byte, bs), 0)
			require.ErrorIs(t, err, blockdev.ErrClosed)
			require.ErrorIs(t, u.Flush(), blockdev.ErrClosed)

			f, err := blockdev.Open(path, blockdev.FileOptions{ReadOnly: true})
			require.NoError(t, err)
			defer f.Close()
			buf := make([]byte, bs)
			for w := range workers {
				require.ErrorIs(t, errs[w], blockdev.ErrClosed, "worker %d", w)
				_, err := f.ReadAt(buf, int64(w*bs))
				require.NoError(t, err)
				require.Equal(t, acked[w], binary.LittleEndian.Uint64(buf), "worker %d", w)
			}
		})
	}
}

func TestURingNotSupportedElsewhere(t *testing.T) {
	if runtime.GOOS == "linux" {
		t.Skip("io_uring exists on Linux; the refusal path is tested in uring_linux_test.go")
	}
	_, err := blockdev.OpenURing(filepath.Join(t.TempDir(), "x"), blockdev.URingOptions{})
	require.ErrorIs(t, err, blockdev.ErrNotSupported)
}
