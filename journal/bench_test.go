package journal

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
)

// BenchmarkJournalCommit measures group commit on a file device: C
// goroutines each Append a 128-byte record and Commit it, b.N records in
// all. flushes/commit falls well below 1 as C grows, because concurrent
// committers share one write and one Flush.
func BenchmarkJournalCommit(b *testing.B) {
	for _, c := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("committers=%d", c), func(b *testing.B) {
			benchCommit(b, c)
		})
	}
}

func benchCommit(b *testing.B, committers int) {
	ctx := context.Background()
	dev, err := blockdev.Create(filepath.Join(b.TempDir(), "journal"), 64<<20, blockdev.FileOptions{})
	require.NoError(b, err)
	defer dev.Close()
	j, err := Format(dev, Options{CheckpointSize: 1 << 20})
	require.NoError(b, err)
	ckptDone := make(chan struct{})
	go func() { // checkpoint when asked, as an engine would
		defer close(ckptDone)
		for range j.NeedCheckpoint() {
			_ = j.Checkpoint(ctx, j.LastSeq(), func(w io.Writer) error { return nil })
		}
	}()
	payload := make([]byte, 128)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, committers)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range committers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if _, err := j.Append(ctx, payload); err != nil {
					errs <- err
					return
				}
				if err := j.Commit(ctx); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	close(errs)
	for err := range errs {
		require.NoError(b, err)
	}
	st := j.Stats()
	require.NoError(b, j.Close())
	<-ckptDone
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "commits/s")
	b.ReportMetric(float64(st.Flushes)/float64(st.Commits), "flushes/commit")
}
