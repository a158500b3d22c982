package meta

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// replayRegion formats a region holding 20,000 keys spread over the chunk
// space, so that a change lands in a leaf of its own, and returns it
// closed, with the changes a replay would apply, in chunk order: deletes
// of a tenth of the keys and puts of as many new ones.
func replayRegion(t *testing.T, seed uint64) (*blockdev.Mem, []replayChange) {
	rng := rand.New(rand.NewPCG(seed, 21))
	mem, err := blockdev.NewMem(8192*PageSize, 4096)
	require.NoError(t, err)
	m, err := Format(mem, Options{DataChunks: 1 << 16, SyncWriteBack: true})
	require.NoError(t, err)
	var changes []replayChange
	for i := range 20000 {
		k := Key{C: uint64(i)*53600 + rng.Uint64N(53600), E: 1} // distinct, spread over 2^30
		_, err := m.PutData(k)
		require.NoError(t, err)
		if i%10 == 3 {
			changes = append(changes, replayChange{k: k, del: true})
		}
		if i%10 == 7 {
			changes = append(changes, replayChange{k: Key{C: k.C + 1, E: 2}, loc: LocSpecial + uint64(i)})
		}
	}
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())
	slices.SortFunc(changes, func(x, y replayChange) int { return keyCmp(x.k, y.k) })
	return mem, changes
}

// replayChange is one put or delete of replayRegion's changes.
type replayChange struct {
	k   Key
	loc uint64
	del bool
}

func replayApply(m *Meta, c replayChange) error {
	if c.del {
		loc, err := m.Delete(c.k)
		if err != nil {
			return err
		}
		return m.FreeData(loc) // as the store frees the chunk a delete drops
	}
	return m.Put(c.k, c.loc)
}

// replayKeys lists m's keys and locations in chunk order.
func replayKeys(t *testing.T, m *Meta) []string {
	var out []string
	require.NoError(t, m.Ascend(Key{}, func(k Key, loc uint64) bool {
		out = append(out, fmt.Sprint(k, loc))
		return true
	}))
	return out
}

// replayCached reports whether every node on the path to q, in both of
// m's trees, is in the cache, looking only in the cache (no read).
func replayCached(m *Meta, q Key) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	m.cache.mu.RLock()
	defer m.cache.mu.RUnlock()
	for _, t := range []tree{m.chunk, m.epoch} {
		for p := t.root; !p.isNil(); {
			n := m.cache.nodes.get(p.loc)
			if n == nil {
				return false
			}
			if n.leaf() {
				break
			}
			p = n.kids[childIndex(t.kind, n, q.run(0))]
		}
	}
	return true
}

// TestReadAheadWindows applies a replay's worth of sorted changes to a
// tree larger than the cache, once change by change and once in
// ReadAhead's windows, and checks that the windows give the same keys,
// that after each ReadAhead every node its window's changes walk is
// cached, and that the changes then read (almost) nothing themselves.
// With a one-page cache, which cannot hold a window, ReadAhead reads
// nothing and the changes read what they need, as without it.
func TestReadAheadWindows(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for _, cache := range []int{512 << 10, PageSize} {
		t.Run(fmt.Sprintf("cache=%d", cache), func(t *testing.T) {
			mem, changes := replayRegion(t, seed)
			if cache == PageSize {
				changes = changes[:400] // each reads its paths: enough to compare
			}
			open := func() (*Meta, *readCounter) {
				dev := &readCounter{Device: mem.Clone()}
				m, err := Open(dev, Options{CacheBytes: cache, SyncWriteBack: true})
				require.NoError(t, err)
				t.Cleanup(func() { _ = m.Close() })
				return m, dev
			}

			plain, pdev := open()
			for _, c := range changes {
				require.NoError(t, replayApply(plain, c))
			}
			plainReads := pdev.reads.Load()

			m, dev := open()
			keys := make([]Key, len(changes))
			for i, c := range changes {
				keys[i] = c.k
			}
			var applyReads int64
			windows := 0
			for k := 0; k < len(keys); {
				n, err := m.ReadAhead(keys[k:])
				require.NoError(t, err)
				require.Positive(t, n, "a window of no keys: the caller cannot progress")
				require.LessOrEqual(t, k+n, len(keys))
				windows++
				if cache > PageSize {
					for _, q := range keys[k : k+n] {
						require.True(t, replayCached(m, q), "key %v of window %d (%d keys) not cached after ReadAhead", q, windows, n)
					}
				}
				before := dev.reads.Load()
				for _, c := range changes[k : k+n] {
					require.NoError(t, replayApply(m, c))
				}
				applyReads += dev.reads.Load() - before
				k += n
			}
			t.Logf("%d changes: %d windows, %d nodes read ahead; changes alone read %d pages, after read-ahead %d",
				len(changes), windows, m.CacheStats().ReadAhead, plainReads, applyReads)
			require.Equal(t, replayKeys(t, plain), replayKeys(t, m))
			require.NoError(t, m.Commit())
			require.NoError(t, m.Check())
			if cache > PageSize {
				require.Greater(t, windows, 2, "the changes fit one window: the windows were not exercised")
				require.Less(t, applyReads*10, plainReads, "the changes read as much after read-ahead as without it")
			} else {
				require.Equal(t, 1, windows, "a one-page cache holds no window: ReadAhead should cover all keys, reading nothing")
				require.Zero(t, m.CacheStats().ReadAhead)
			}
		})
	}
}

// TestReadAheadReadError: a device error during ReadAhead is returned,
// typed as the device's, and changes nothing: the open transaction is not
// failed, and once the device reads again the same changes apply, commit
// and read back.
func TestReadAheadReadError(t *testing.T) {
	mem, changes := replayRegion(t, blockdevtest.Seed(t))
	dev := blockdevtest.NewFaulty(mem)
	m, err := Open(dev, Options{CacheBytes: 512 << 10, SyncWriteBack: true})
	require.NoError(t, err)
	defer m.Close()
	keys := make([]Key, len(changes))
	for i, c := range changes {
		keys[i] = c.k
	}
	injected := errors.New("injected read error")
	for _, nth := range []int{1, 2, 3} {
		dev.Clear()
		dev.FailNth(blockdevtest.OpRead, dev.Count(blockdevtest.OpRead)+nth, injected)
		_, err = m.ReadAhead(keys[len(keys)/3:])
		require.ErrorIs(t, err, injected, "read %d of the read-ahead", nth)
	}
	dev.Clear()
	for k := 0; k < len(keys); {
		n, err := m.ReadAhead(keys[k:])
		require.NoError(t, err, "ReadAhead after the device recovered")
		for _, c := range changes[k : k+n] {
			require.NoError(t, replayApply(m, c), "a change after a failed read-ahead")
		}
		k += n
	}
	want := replayKeys(t, m)
	require.NoError(t, m.Commit())
	require.NoError(t, m.Close())
	_, err = m.ReadAhead(keys)
	require.ErrorIs(t, err, ErrClosed)

	m, err = Open(mem, Options{})
	require.NoError(t, err)
	defer m.Close()
	require.Equal(t, want, replayKeys(t, m))
	require.NoError(t, m.Check())
}
