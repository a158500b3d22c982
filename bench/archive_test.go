package bench

import "testing"

// BenchmarkArchive/op=O: full and incremental backups of a 1 GiB snapshot
// and a restore (MB/s of volume), and lazy 4 KiB random reads from a cold
// and a warm cache (p50-ns, p99-ns), against a local versitygw (skipped
// where versitygw is missing). One iteration is one backup or restore, or
// 1000 lazy reads: run with -benchtime 1x (or 3x).
func BenchmarkArchive(b *testing.B) {
	Archive(b, env)
}
