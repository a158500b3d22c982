package clone

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// A clone opened with Options.ReadOnly over read-only views of its three
// devices reads what the clone holds, checks clean, refuses every change
// with ErrReadOnly, starts no goroutine and leaves every byte as it was; a
// read-write open afterwards reads the same. Both metadata sync modes.
func TestReadOnlyOpenWritesNothing(t *testing.T) {
	for _, nosync := range []bool{false, true} {
		t.Run(fmt.Sprintf("nosync=%v", nosync), func(t *testing.T) {
			blockdevtest.CheckLeaks(t)
			const size = 2 << 20
			src, _ := newSource(t, size, 512)
			dst, meta := blockdevtest.NewMem(t, size, 4096), blockdevtest.NewMem(t, MetadataSize(size, 0), 4096)
			c, err := Create(src, dst, meta, Options{NoHydration: true, NoMetadataSync: nosync})
			require.NoError(t, err)
			// Some regions hydrated by writes, one discarded, the rest not.
			_, err = c.WriteAt(bytes.Repeat([]byte{7}, 4096), 64<<10+512*8)
			require.NoError(t, err)
			_, err = c.WriteAt(bytes.Repeat([]byte{8}, 128<<10), 512<<10)
			require.NoError(t, err)
			require.NoError(t, c.Discard(1<<20, 64<<10))
			want := blockdevtest.ReadAll(t, c)
			require.NoError(t, c.Close())
			before := [3][]byte{blockdevtest.ReadAll(t, src), blockdevtest.ReadAll(t, dst), blockdevtest.ReadAll(t, meta)}

			ro, err := Open(blockdev.ReadOnly(src), blockdev.ReadOnly(dst), blockdev.ReadOnly(meta),
				Options{ReadOnly: true, HydrateOnRead: true})
			require.NoError(t, err)
			require.Equal(t, want, blockdevtest.ReadAll(t, ro))
			require.NoError(t, ro.Check())
			require.True(t, ro.CheckReport().OK())
			st := ro.Status()
			require.Equal(t, Paused, st.State)
			require.Equal(t, uint64(4), st.Hydrated) // regions 1, 8, 9 written; 16 discarded
			_, err = ro.WriteAt(make([]byte, 4096), 0)
			require.ErrorIs(t, err, blockdev.ErrReadOnly)
			_, err = ro.WriteAtFUA(make([]byte, 4096), 0)
			require.ErrorIs(t, err, blockdev.ErrReadOnly)
			require.ErrorIs(t, ro.Discard(0, 4096), blockdev.ErrReadOnly)
			require.NoError(t, ro.Flush())
			require.NoError(t, ro.Close())
			require.Equal(t, before, [3][]byte{blockdevtest.ReadAll(t, src), blockdevtest.ReadAll(t, dst), blockdevtest.ReadAll(t, meta)})

			_, err = Create(src, dst, meta, Options{ReadOnly: true})
			require.ErrorIs(t, err, ErrOptions)
			rw, err := Open(src, dst, meta, Options{NoHydration: true})
			require.NoError(t, err)
			require.Equal(t, want, blockdevtest.ReadAll(t, rw))
			require.NoError(t, rw.Check())
			require.NoError(t, rw.Close())
		})
	}
}

// CheckReport lists every problem rather than stopping at the first.
func TestCheckReportsEveryProblem(t *testing.T) {
	const size = 1 << 20
	src, _ := newSource(t, size, 512)
	c, err := Create(src, blockdevtest.NewMem(t, size, 512), blockdevtest.NewMem(t, MetadataSize(size, 0), 512), Options{NoHydration: true})
	require.NoError(t, err)
	defer c.Close()
	require.True(t, c.CheckReport().OK())
	m := c.md
	m.mu.Lock()
	m.count += 2           // counter off
	m.durable.Set(3)       // in the journal, not hydrated
	m.dirty.Set(uint(400)) // beyond the last region
	m.mu.Unlock()
	undo := func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.count -= 2
		m.durable.Clear(3)
		m.dirty.Clear(400)
	}
	defer func() {
		if t.Failed() {
			undo() // before Close, which would commit the bogus bit
		}
	}()
	rep := c.CheckReport()
	require.Len(t, rep.Problems, 5, "%q", rep.Problems)
	err = c.Check()
	require.ErrorIs(t, err, ErrCorrupt)
	var ce *blockdev.CheckError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, rep.Problems, ce.Problems)
	undo()
	require.NoError(t, c.Check())
}
