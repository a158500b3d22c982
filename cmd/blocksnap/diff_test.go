package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/snapshot"
	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

// scribble writes n random extents (some of zeros, one discard) through the
// store's origin.
func (f fixture) scribble(t *testing.T, rng *rand.Rand, n int) {
	t.Helper()
	f.withStore(t, func(st *snapshot.Store) {
		v := st.Origin()
		defer v.Close()
		for range n {
			blocks := 1 + rng.IntN(40)
			p := make([]byte, blocks*4096)
			if rng.IntN(5) > 0 {
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
			}
			off := int64(rng.IntN(int(v.Size()/4096)-blocks)) * 4096
			_, err := v.WriteAt(p, off)
			require.NoError(t, err)
		}
		require.NoError(t, v.Discard(int64(rng.IntN(200))*65536, 65536))
		require.NoError(t, v.Flush())
	})
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return b
}

// Full then three incrementals onto a blank file equal the last snapshot
// byte for byte; one goes through a pipe (standard output into standard
// input). Out-of-order streams are refused, re-applying is a no-op, an
// interrupted apply resumes, a corrupted stream is refused with the target
// left at a known state.
func TestExportApplyRoundTrip(t *testing.T) {
	seed := uint64(42)
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	f := newFixture(t)
	f.scribble(t, rng, 60)
	ok(t, f.args("snapshot", "s0")...)
	for i := 1; i <= 3; i++ {
		f.scribble(t, rng, 20)
		ok(t, f.args("snapshot", "s"+string(rune('0'+i)))...)
	}
	streams := map[string]string{}
	for _, name := range []string{"full", "s0-s1", "s1-s2", "s2-s3"} {
		path := filepath.Join(f.dir, name+".bsd")
		streams[name] = path
		if name == "full" {
			out := ok(t, f.args("export-diff", "s0", "-o", path)...)
			require.Contains(t, out, "full export of s0 written to")
		} else {
			out := ok(t, f.args("export-diff", "--from", name[:2], name[3:], "-o", path, "--json")...)
			var sum streamSummary
			require.NoError(t, json.Unmarshal([]byte(out), &sum))
			require.False(t, sum.Full)
			require.Positive(t, sum.Records)
		}
	}
	target := filepath.Join(f.dir, "restore.img")

	// Incrementals before the base are refused.
	fails(t, 1, "target state is unknown", "apply-diff", "--target", target, "-i", streams["s0-s1"])

	// The base export through a pipe, from export-diff's standard output.
	full := bs(t, nil, f.args("export-diff", "s0")...)
	require.Equal(t, 0, full.code, full.stderr)
	require.Equal(t, readFile(t, streams["full"])[:40], []byte(full.stdout)[:40])
	r := bs(t, bytes.NewReader([]byte(full.stdout)), "apply-diff", "--target", target)
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "target is at s0")
	require.Equal(t, f.image(t, "s0"), readFile(t, target))

	fails(t, 1, "target is at s0", "apply-diff", "--target", target, "-i", streams["s1-s2"])

	// s0 -> s1, interrupted: a truncated stream applies in part, the state
	// file says how far, and the whole stream then resumes.
	whole := readFile(t, streams["s0-s1"])
	cut := filepath.Join(f.dir, "cut.bsd")
	require.NoError(t, os.WriteFile(cut, whole[:len(whole)*2/3], 0o644))
	fails(t, 1, "stream truncated", "apply-diff", "--target", target, "-i", cut, "--json")
	st, err := diffstream.ReadState(target + ".bsstate")
	require.NoError(t, err)
	require.NotNil(t, st.Partial, "state: %s", st)
	out := ok(t, "apply-diff", "--target", target, "-i", streams["s0-s1"], "--json")
	var sum streamSummary
	require.NoError(t, json.Unmarshal([]byte(out), &sum))
	require.Equal(t, st.Partial.Records, sum.Resumed)
	require.Equal(t, f.image(t, "s1"), readFile(t, target))

	// s1 -> s2 corrupted: refused with a clear error; the target is left
	// at a state the file records exactly; the good stream then applies.
	bad := readFile(t, streams["s1-s2"])
	bad[len(bad)/2] ^= 0x10
	badPath := filepath.Join(f.dir, "bad.bsd")
	require.NoError(t, os.WriteFile(badPath, bad, 0o644))
	fails(t, 1, "corrupt stream: record", "apply-diff", "--target", target, "-i", badPath)
	st, err = diffstream.ReadState(target + ".bsstate")
	require.NoError(t, err)
	require.NotNil(t, st.Partial)
	require.Equal(t, "s2", st.Partial.To.Name)
	ok(t, "apply-diff", "--target", target, "-i", streams["s1-s2"])
	require.Equal(t, f.image(t, "s2"), readFile(t, target))

	out = ok(t, "apply-diff", "--target", target, "-i", streams["s2-s3"])
	require.Contains(t, out, "target is at s3")
	require.Equal(t, f.image(t, "s3"), readFile(t, target), "full + 3 incrementals equal the last snapshot")
	require.Contains(t, ok(t, "apply-diff", "--target", target, "-i", streams["s2-s3"]), "nothing to do")

	// Forced: an old incremental applies anyway.
	ok(t, "apply-diff", "--target", target, "-i", streams["s0-s1"], "--force")

	// Not a stream at all.
	fails(t, 1, "no such file or directory", "apply-diff", "--target", target, "-i", streams["full"]+".nope")
	require.NoError(t, os.WriteFile(badPath, []byte("hello, this is not a diff stream"), 0o644))
	fails(t, 1, "not a blocksnap diff stream", "apply-diff", "--target", target, "-i", badPath)

	// A disk image as the target is refused, untouched.
	qcow := filepath.Join(f.dir, "disk.qcow2")
	img := append([]byte("QFI\xfb"), make([]byte, 1<<20)...)
	require.NoError(t, os.WriteFile(qcow, img, 0o644))
	fails(t, 1, "target "+qcow+" is a qcow2 image, not a raw disk; convert it first", "apply-diff", "--target", qcow, "-i", streams["full"])
	require.Equal(t, img, readFile(t, qcow))
}
