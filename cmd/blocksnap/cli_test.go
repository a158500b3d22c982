package main

import (
	"bytes"
	le "encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/exception"
)

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		err  string
	}{
		{"4096", 4096, ""},
		{"64K", 64 << 10, ""},
		{"64KiB", 64 << 10, ""},
		{"64kb", 64 << 10, ""},
		{"1.5GiB", 3 << 29, ""},
		{"1.5 GiB", 3 << 29, ""},
		{"2T", 2 << 40, ""},
		{"0", 0, ""},
		{"1.3KiB", 0, "not a whole number of bytes"},
		{"0.5", 0, "not a whole number of bytes"},
		{"12X", 0, "want a number"},
		{"-1", 0, "want a number"},
		{"1.2.3G", 0, "want a number"},
		{"", 0, "want a number"},
		{"9999999P", 0, "too large"},
	} {
		n, err := parseSize(c.in)
		if c.err != "" {
			require.ErrorContains(t, err, c.err, c.in)
			continue
		}
		require.NoError(t, err, c.in)
		require.Equal(t, c.want, n, c.in)
	}
	require.Equal(t, "1.5GiB", human(3<<29))
	require.Equal(t, "64KiB", human(64<<10))
	require.Equal(t, "512B", human(512))
}

func TestMessageDropsLibraryPrefixes(t *testing.T) {
	for in, want := range map[string]string{
		"snapshot: bad options: chunk size 3072: a power of two":  "chunk size 3072: a power of two",
		`snapshot: no such volume: "x"`:                           `no such volume: "x"`,
		"source: blockdev: open: open /x: no such file":           "source: open: open /x: no such file",
		"meta /m holds no valid clone metadata: clone: corrupt\n": "meta /m holds no valid clone metadata: corrupt",
		"volume snapshot: x":                                      "volume snapshot: x",
		"nbd":                                                     "nbd",
	} {
		require.Equal(t, want, message(fmt.Errorf("%s", in)), in)
	}
}

// A panic in a command is a one-line bug report and exit status 70.
func TestPanicIsExit70(t *testing.T) {
	saved := commands
	t.Cleanup(func() { commands = saved })
	commands = append(commands[:len(commands):len(commands)], &command{name: "boom", define: func(*pflag.FlagSet) func(*env, []string) error {
		return func(*env, []string) error {
			var p []int
			_ = p[len(os.Args)+1] // a runtime panic: index out of range
			return nil
		}
	}})
	var stderr bytes.Buffer
	e := &env{ctx: t.Context(), stdout: &bytes.Buffer{}, stderr: &stderr}
	require.Equal(t, exitSoftware, run(e, []string{"boom"}))
	require.Equal(t, 1, strings.Count(stderr.String(), "\n"), stderr.String())
	require.Contains(t, stderr.String(), "blocksnap: internal error (a bug; please report")
	require.Contains(t, stderr.String(), "index out of range")
	require.Contains(t, stderr.String(), "cli_test.go:")
}

func TestVersion(t *testing.T) {
	out := ok(t, "--version")
	require.True(t, strings.HasPrefix(out, "blocksnap "), out)
	require.Contains(t, out, runtime.Version())
	require.Equal(t, out, ok(t, "version"))
}

// Every command's help starts with its usage line, which names its
// positional arguments and its required flags, and lists every flag.
func TestHelpMatchesUsage(t *testing.T) {
	for _, c := range commands {
		fs, _ := newFlagSet(c)
		out := ok(t, c.name, "--help")
		line, _, _ := strings.Cut(out, "\n")
		require.Equal(t, "Usage: "+synopsis(c, fs), line)
		require.Contains(t, line, strings.TrimSpace("blocksnap "+c.name+" "+c.args))
		fs.VisitAll(func(f *pflag.Flag) {
			require.Contains(t, out, "--"+f.Name+" ", "%s --help lists --%s", c.name, f.Name)
			if isRequired(f) {
				require.Contains(t, line, "--"+f.Name+" ", "%s: the usage line names the required --%s", c.name, f.Name)
			}
		})
		require.Equal(t, out, ok(t, "help", c.name), "blocksnap help %s", c.name)
	}
}

func TestOldSingleDashFlags(t *testing.T) {
	f := newFixture(t)
	require.Contains(t, ok(t, "snapshot", "-origin", f.origin, "-store="+f.store, "s1", "-json"), `"name": "s1"`)
	require.Contains(t, ok(t, "list", "-origin", f.origin, "-store", f.store), "s1")
	fails(t, 2, "--progress and --no-progress contradict each other", f.args("list", "--progress", "--no-progress")...)
}

func TestProgressFlag(t *testing.T) {
	f := newFixture(t)
	f.write(t, 0, 1<<20, 0x11)
	ok(t, f.args("snapshot", "s1")...)
	r := bs(t, nil, f.args("export-diff", "s1", "-o", filepath.Join(f.dir, "s1.bsd"), "--progress")...)
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stderr, "\r\x1b[Kexport-diff s1: 1MiB / 16MiB", "--progress draws on a non-terminal")
	r = bs(t, nil, append([]string{"--progress"}, f.args("export-diff", "s1", "-o", filepath.Join(f.dir, "s3.bsd"))...)...)
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stderr, "export-diff s1: ", "--progress before the command")
	r = bs(t, nil, f.args("export-diff", "s1", "-o", filepath.Join(f.dir, "s2.bsd"))...)
	require.Equal(t, 0, r.code, r.stderr)
	require.Empty(t, r.stderr, "no progress when stderr is not a terminal")
}

func TestCompletion(t *testing.T) {
	script := ok(t, "completion", "bash")
	require.Contains(t, ok(t, "completion", "zsh"), "bashcompinit")
	fish := ok(t, "completion", "fish")
	require.Contains(t, fish, "complete -c blocksnap -n '__fish_seen_subcommand_from snapshot' -l origin -r -F")
	fails(t, 2, `unknown shell "tcsh"`, "completion", "tcsh")
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash is not installed")
	}
	complete := func(words ...string) string {
		t.Helper()
		path := filepath.Join(t.TempDir(), "c.bash")
		quoted := make([]string, len(words))
		for i, w := range words {
			quoted[i] = fmt.Sprintf("%q", w)
		}
		prog := fmt.Sprintf("%s\nCOMP_WORDS=(%s); COMP_CWORD=%d; _blocksnap; echo \"${COMPREPLY[*]}\"\n", script, strings.Join(quoted, " "), len(words)-1)
		require.NoError(t, os.WriteFile(path, []byte(prog), 0o644))
		out, err := exec.Command(bash, path).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return strings.TrimSpace(string(out))
	}
	require.Equal(t, "stat status", complete("blocksnap", "st"))
	require.Equal(t, "serve set-rate", complete("blocksnap", "se"))
	require.Equal(t, "--origin", complete("blocksnap", "snapshot", "--or"))
	require.Equal(t, "--output", complete("blocksnap", "export-diff", "--out"))
	require.Equal(t, "", complete("blocksnap", "format", "--size", ""), "a size is not a file name")
}

// Refuse, don't guess: an image file, a size that is not whole blocks;
// a failed format leaves no file behind.
func TestFormatRefuses(t *testing.T) {
	dir := t.TempDir()
	origin, store := filepath.Join(dir, "o"), filepath.Join(dir, "s")
	fails(t, 2, "--size of 1000000 bytes is not a whole number of 4KiB blocks", "format", "--origin", origin, "--store", store, "--size", "1000000")
	requireAbsent(t, origin, store)
	fails(t, 1, "chunk size 3072", "format", "--origin", origin, "--store", store, "--size", "16MiB", "--chunk-size", "3KiB")
	requireAbsent(t, origin, store)

	require.NoError(t, os.WriteFile(origin, make([]byte, 4096*3+512), 0o644))
	fails(t, 1, "is 12800 bytes, not a whole number of 4KiB blocks", "format", "--origin", origin, "--store", store, "--size", "16MiB")
	requireAbsent(t, store)

	require.NoError(t, os.WriteFile(origin, make([]byte, 1<<20), 0o644))
	fails(t, 1, "origin "+origin+" exists with 1048576 bytes, not the 16777216 of --size (it is not resized: drop --size", "format", "--origin", origin, "--store", store, "--size", "16MiB")
	requireAbsent(t, store)
	fails(t, 2, "--origin and --store are the same file", "format", "--origin", origin, "--store", origin)

	images := map[string][]byte{"qcow2": []byte("QFI\xfb\x00\x00\x00\x03"), "VMDK": []byte("KDMV\x01"), "VHDX": []byte("vhdxfile")}
	for name, magic := range images {
		p := make([]byte, 1<<20)
		copy(p, magic)
		require.NoError(t, os.WriteFile(origin, p, 0o644))
		fails(t, 1, fmt.Sprintf("origin %s is a %s image, not a raw disk; convert it first: qemu-img convert -O raw %s %s.raw", origin, name, origin, origin),
			"format", "--origin", origin, "--store", store, "--store-size", "16MiB")
		requireAbsent(t, store)
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed: real images not tried")
	}
	for _, fmtName := range []string{"qcow2", "vmdk", "vhdx", "vpc", "vdi"} {
		img := filepath.Join(dir, "disk."+fmtName)
		out, err := exec.Command("qemu-img", "create", "-f", fmtName, img, "16M").CombinedOutput()
		require.NoError(t, err, "%s", out)
		fails(t, 1, "image, not a raw disk; convert it first: qemu-img convert", "format", "--origin", img, "--store", store, "--store-size", "16MiB")
		requireAbsent(t, store)
	}
}

func requireAbsent(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		_, err := os.Stat(p)
		require.True(t, os.IsNotExist(err), "%s must not exist", p)
	}
}

// A dead nbd:// source is an error naming it, for hydrate and status: no
// panic.
func TestDeadSource(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	dead := "nbd://" + l.Addr().String() + "/golden"
	require.NoError(t, l.Close())

	dir := t.TempDir()
	dest, meta := filepath.Join(dir, "dest.img"), filepath.Join(dir, "meta")
	fails(t, 1, "source "+dead+": ", "hydrate", "--source", dead, "--dest", dest, "--meta", meta)
	requireAbsent(t, dest, meta)
	// A clone that cannot be made leaves no files either.
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, randomImage(t, 4, 1<<20), 0o644))
	fails(t, 1, "region", "hydrate", "--source", src, "--dest", dest, "--meta", meta, "--region-size", "3KiB")
	requireAbsent(t, dest, meta)

	// A clone made from a file, then asked about with a source that is gone.
	ok(t, "hydrate", "--source", src, "--dest", dest, "--meta", meta)
	fails(t, 1, "source "+dead+": ", "status", "--meta", meta, "--source", dead, "--dest", dest)
	fails(t, 1, "source "+dead+": ", "check", "--meta", meta, "--source", dead, "--dest", dest)
	fails(t, 2, "no hydrate is running on "+meta+": give --source and --dest", "status", "--meta", meta)
	fails(t, 2, "no hydrate is running on "+meta+": give --source and --dest", "check", "--meta", meta)
	require.Contains(t, ok(t, "check", "--meta", meta, "--source", src, "--dest", dest), "clone "+meta+" is clean")
	fails(t, 1, "no hydrate is running on "+meta, "pause", "--meta", meta)
}

// pause, resume and set-rate reach a running hydrate; status needs only
// --meta then; a second hydrate on the clone names the first.
func TestHydrateControl(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, randomImage(t, 5, 8<<20), 0o644))
	meta := filepath.Join(dir, "meta")
	flags := []string{"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", meta}
	fails(t, 2, "--metrics needs --serve", append([]string{"hydrate", "--metrics", "127.0.0.1:0"}, flags...)...)
	d := startDaemon(t, append([]string{"hydrate", "--serve", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "64KiB", "--json"}, flags...)...)
	require.NotEmpty(t, d.info.Metrics)

	status := func(cmd ...string) control.CloneStatus {
		t.Helper()
		var st control.CloneStatus
		require.NoError(t, json.Unmarshal([]byte(ok(t, append(cmd, "--meta", meta, "--json")...)), &st))
		return st
	}
	require.Equal(t, int64(64<<10), status("status").RateLimit)
	require.Equal(t, "paused", status("pause").State)
	require.Equal(t, "paused", status("status").State)
	var rep control.CheckReport
	require.NoError(t, json.Unmarshal([]byte(ok(t, "check", "--meta", meta, "--json")), &rep))
	require.True(t, rep.OK && rep.Live, "%+v", rep)
	fails(t, 1, fmt.Sprintf("is in use by blocksnap hydrate (pid %d, control socket %s.control); it is already hydrating this clone", d.cmd.Process.Pid, meta),
		append([]string{"hydrate"}, flags...)...)
	require.Equal(t, int64(0), status("set-rate", "--rate", "0").RateLimit)
	require.Contains(t, ok(t, "set-rate", "--meta", meta, "--rate", "1.5GiB"), "capped at 1.5GiB/s")
	require.NotEqual(t, "paused", status("resume").State)
	st := waitStatus(t, []string{"--meta", meta}, func(s control.CloneStatus) bool { return s.State == "hydrated" })
	require.Equal(t, st.Regions, st.Hydrated)
	d.stop(t)
	require.Equal(t, readFile(t, src), readFile(t, flags[3]))
}

// check --cow reads a persistent dm-snapshot COW device without writing
// it, and reports every problem with exit status 1.
func TestCheckCOW(t *testing.T) {
	dir := t.TempDir()
	cowPath := filepath.Join(dir, "cow")
	const chunk = 4096
	{
		m, err := blockdev.NewMem(1<<20, 512)
		require.NoError(t, err)
		o, err := exception.NewOrigin(m, exception.OriginOptions{})
		require.NoError(t, err)
		cow, err := blockdev.Create(cowPath, 1<<20, blockdev.FileOptions{BlockSize: 512})
		require.NoError(t, err)
		s, err := o.CreateSnapshot(cow, exception.Options{Persistent: true, ChunkSize: chunk})
		require.NoError(t, err)
		for i := range 3 {
			_, err = o.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, chunk), int64(i)*2*chunk)
			require.NoError(t, err)
		}
		require.NoError(t, o.Flush())
		require.NoError(t, s.Close())
		require.NoError(t, o.Close())
		require.NoError(t, cow.Close())
	}
	before := readFile(t, cowPath)
	var rep control.CheckReport
	require.NoError(t, json.Unmarshal([]byte(ok(t, "check", "--cow", cowPath, "--json")), &rep))
	require.True(t, rep.OK, "%+v", rep)
	require.Equal(t, "exception", rep.Engine)
	require.Equal(t, before, readFile(t, cowPath), "check wrote to the COW device")

	// Two exceptions pointing at one COW chunk and at a metadata chunk:
	// area 0 is chunk 1; entries are (old, new) little-endian pairs.
	p := readFile(t, cowPath)
	entry := func(j int, old, new uint64) {
		le.LittleEndian.PutUint64(p[chunk+16*j:], old)
		le.LittleEndian.PutUint64(p[chunk+16*j+8:], new)
	}
	newOf0 := le.LittleEndian.Uint64(p[chunk+8:])
	entry(1, 7, newOf0)
	require.NoError(t, os.WriteFile(cowPath, p, 0o644))
	r := bs(t, nil, "check", "--cow", cowPath)
	require.Equal(t, 1, r.code, "stdout %s stderr %s", r.stdout, r.stderr)
	require.Contains(t, r.stdout, "problems:")
	require.Contains(t, r.stdout, fmt.Sprintf("area 0 (chunk 1) entry 1: COW chunk %d used twice", newOf0))
	require.Contains(t, r.stderr, "failed its check")

	// Two exceptions for one origin chunk (the kernel loads that; the
	// later wins) and one beyond the device: both reported, not just the
	// first.
	p = bytes.Clone(before)
	entry(1, le.LittleEndian.Uint64(p[chunk:]), le.LittleEndian.Uint64(p[chunk+16+8:]))
	entry(2, 9, 1<<30)
	require.NoError(t, os.WriteFile(cowPath, p, 0o644))
	r = bs(t, nil, "check", "--cow", cowPath)
	require.Equal(t, 1, r.code, "stdout %s stderr %s", r.stdout, r.stderr)
	require.Contains(t, r.stdout, "has 2 problems:")
	require.Contains(t, r.stdout, "origin chunk 0 has a second exception")
	require.Contains(t, r.stdout, "entry 2: COW chunk 1073741824")

	// A snapshot the kernel invalidated.
	le.LittleEndian.PutUint32(p[4:], 0) // the header's valid word
	require.NoError(t, os.WriteFile(cowPath, p, 0o644))
	r = bs(t, nil, "check", "--cow", cowPath)
	require.Equal(t, 1, r.code, "stdout %s stderr %s", r.stdout, r.stderr)
	require.Contains(t, r.stdout, "the snapshot is marked invalid")

	zeros := filepath.Join(dir, "zeros")
	require.NoError(t, os.WriteFile(zeros, make([]byte, 1<<20), 0o644))
	r = bs(t, nil, "check", "--cow", zeros)
	require.Equal(t, 1, r.code, "stdout %s stderr %s", r.stdout, r.stderr)
	require.Contains(t, r.stdout, "exception "+zeros+" has 1 problems:")
	fails(t, 1, "no such file or directory", "check", "--cow", filepath.Join(dir, "missing"))
}

// The inspecting commands open read-only: the store's and the clone's
// files are byte for byte the same afterwards.
func TestInspectionWritesNothing(t *testing.T) {
	f := newFixture(t)
	f.write(t, 0, 256<<10, 0x21)
	ok(t, f.args("snapshot", "s1")...)
	f.write(t, 64<<10, 64<<10, 0x22)
	ok(t, f.args("snapshot", "s2")...)
	origin, store := readFile(t, f.origin), readFile(t, f.store)
	for _, c := range [][]string{{"list"}, {"stat", "s1"}, {"usage"}, {"diff", "s1", "s2"}, {"check"}, {"dump"},
		{"export-diff", "s2", "--from", "s1", "-o", filepath.Join(f.dir, "x.bsd")}} {
		ok(t, f.args(c...)...)
		require.Equal(t, store, readFile(t, f.store), "%v changed the store", c)
		require.Equal(t, origin, readFile(t, f.origin), "%v changed the origin", c)
	}

	dir := t.TempDir()
	src := filepath.Join(dir, "golden.img")
	require.NoError(t, os.WriteFile(src, randomImage(t, 6, 1<<20), 0o644))
	flags := []string{"--source", src, "--dest", filepath.Join(dir, "dest.img"), "--meta", filepath.Join(dir, "meta")}
	ok(t, append([]string{"hydrate"}, flags...)...)
	dest, meta := readFile(t, flags[3]), readFile(t, flags[5])
	for _, c := range []string{"status", "check"} {
		ok(t, append([]string{c}, flags...)...)
		require.Equal(t, dest, readFile(t, flags[3]), "%s changed the destination", c)
		require.Equal(t, meta, readFile(t, flags[5]), "%s changed the metadata", c)
	}
}

// The examples in the help parse: every flag they use exists, and the
// positional arguments and required flags are there.
func TestExamplesParse(t *testing.T) {
	for _, c := range commands {
		for _, ex := range c.examples {
			for _, part := range strings.Split(ex, " | ") {
				part, _, _ = strings.Cut(part, " < ")
				words := strings.Fields(part)
				if len(words) < 2 || words[0] != "blocksnap" {
					continue
				}
				x := lookup(words[1])
				require.NotNil(t, x, "example %q", ex)
				fs, _ := newFlagSet(x)
				require.NoError(t, fs.Parse(gnuArgs(fs, words[2:])), "example %q", ex)
				require.Empty(t, missingRequired(fs), "example %q", ex)
				n := len(fs.Args())
				require.True(t, n >= x.lo && (x.hi < 0 || n <= x.hi), "example %q: %d positional arguments", ex, n)
			}
		}
	}
}
