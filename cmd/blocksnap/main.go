// Command blocksnap operates blocksnap snapshot stores, ships incremental
// diffs between snapshots, serves volumes over NBD and runs clone targets
// from the command line.
//
// Usage:
//
//	blocksnap COMMAND [ARGS] [--flags]
//	blocksnap COMMAND --help
//
// Flags are GNU-style (--long, and -o, -i, -h shorthands; the old
// single-dash long form -origin is still read). Sizes take binary units:
// 1.5GiB, 64KiB, 4096. Each command's page is docs/cli/COMMAND.md in the
// repository, generated from the flag definitions here.
//
// Store commands take --origin PATH --store PATH (regular files or block
// device nodes): format, snapshot, clone, list, delete, rename, rollback,
// stat, usage, check, dump, diff, export-diff, serve. apply-diff writes a diff
// stream onto a file or device. Clone target commands: hydrate, status,
// pause, resume, set-rate.
//
// Exit status: 0 success, 1 failure, 2 bad usage, 70 an internal error (a
// bug). Errors go to standard error on one line.
//
// The store is locked (flock, taken by snapshot.Open) while a command uses
// it. While `serve` holds it, the other store commands act on the live
// server through its control socket (a Unix socket, default STORE.control;
// package control, schema in docs/control.md); it refuses to delete a
// volume that NBD clients are connected to unless --force. While `hydrate`
// holds a clone, status, pause, resume and set-rate go through its socket
// (default META.control).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/spf13/pflag"
	"golang.org/x/term"
)

// env is what a command runs with: the streams and a context that ends
// on SIGINT or SIGTERM.
type env struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// progress: draw progress on stderr (default: when it is a terminal;
	// --progress, --no-progress decide otherwise).
	progress bool
}

// command is one subcommand. define registers its flags and returns the
// function that runs it with the positional arguments; the flag set is
// also what --help, the usage line, shell completion and docs/cli are
// generated from, so they cannot disagree.
type command struct {
	name    string
	args    string // positional arguments in the usage line ("NAME", "FROM [TO]")
	lo, hi  int    // how many positional arguments (hi < 0: any number)
	summary string
	// long is more help, printed after the summary.
	long string
	// examples are command lines shown in the help and the docs.
	examples []string
	define   func(fs *pflag.FlagSet) func(e *env, pos []string) error
}

var commands []*command

func init() {
	commands = []*command{
		cmdFormat, cmdCreate, cmdImport, cmdSnapshot, cmdClone, cmdList, cmdDelete, cmdRename, cmdResize, cmdRollback, cmdProtect, cmdUnprotect, cmdStat, cmdUsage, cmdGrow,
		cmdCheck, cmdDump, cmdDiff, cmdExportDiff, cmdApplyDiff, cmdServe, cmdMigrate,
		cmdHydrate, cmdStatus, cmdPause, cmdResume, cmdSetRate,
		cmdBackup, cmdRestore, cmdArchive,
		cmdCompletion, cmdVersion,
	}
}

// usageError is bad usage: exit status 2.
type usageError struct{ msg string }

func (u *usageError) Error() string { return u.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// errHelp: --help was given and answered.
var errHelp = errors.New("help shown")

// Exit statuses.
const (
	exitOK       = 0
	exitFailure  = 1
	exitUsage    = 2
	exitSoftware = 70 // EX_SOFTWARE: an internal error, a bug
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	e := &env{ctx: ctx, stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr,
		progress: term.IsTerminal(int(os.Stderr.Fd()))}
	code := run(e, os.Args[1:])
	stop()
	os.Exit(code)
}

// run executes the command line and returns the exit status. A panic in
// the command (on this goroutine) is a bug: one line naming where, and
// exit status 70.
func run(e *env, args []string) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(e.stderr, "blocksnap: internal error (a bug; please report this line and the output of blocksnap --version): panic: %s at %s\n",
				oneLine(fmt.Sprint(r)), panicSite())
			code = exitSoftware
		}
	}()
	// The flags every command takes may also come before the command.
	var global []string
	for len(args) > 0 && (args[0] == "--progress" || args[0] == "--no-progress") {
		global, args = append(global, args[0]), args[1:]
	}
	if len(args) == 0 {
		topUsage(e.stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "--help", "help":
		if len(args) > 1 {
			return run(e, []string{args[1], "--help"})
		}
		topUsage(e.stdout)
		return exitOK
	case "--version", "-version":
		args[0] = "version"
	}
	c := lookup(args[0])
	if c == nil {
		fmt.Fprintf(e.stderr, "blocksnap: unknown command %q (see blocksnap --help)\n", args[0])
		return exitUsage
	}
	err := runCommand(e, c, append(global, args[1:]...))
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, errHelp):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "blocksnap %s: %s (see blocksnap %s --help)\n", c.name, oneLine(ue.msg), c.name)
		return exitUsage
	}
	fmt.Fprintf(e.stderr, "blocksnap %s: %s\n", c.name, message(err))
	return exitFailure
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// panicSite is the file and line that panicked: the first frame below the
// runtime's panic machinery.
func panicSite() string {
	pcs := make([]uintptr, 32)
	n := runtime.Callers(3, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	for {
		f, more := frames.Next()
		if !strings.HasPrefix(f.Function, "runtime.") {
			return fmt.Sprintf("%s (%s:%d)", f.Function, trimPath(f.File), f.Line)
		}
		if !more {
			return "unknown"
		}
	}
}

func trimPath(p string) string {
	if i := strings.LastIndex(p, "/blocksnap/"); i >= 0 {
		return p[i+1:]
	}
	return p
}

// newFlagSet returns c's flag set with its own flags and the ones every
// command takes, and the command's runner.
func newFlagSet(c *command) (*pflag.FlagSet, func(e *env, pos []string) error) {
	fs := pflag.NewFlagSet("blocksnap "+c.name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.SortFlags = false
	fs.Usage = func() {}
	runner := c.define(fs)
	fs.BoolP("help", "h", false, "show this help")
	fs.Bool("progress", false, "draw progress on standard error even when it is not a terminal")
	fs.Bool("no-progress", false, "draw no progress even on a terminal")
	return fs, runner
}

// runCommand parses args for c (flags and positional arguments in any
// order; "--" ends the flags) and runs it.
func runCommand(e *env, c *command, args []string) error {
	fs, runner := newFlagSet(c)
	if err := fs.Parse(gnuArgs(fs, args)); err != nil {
		return usagef("%s", strings.TrimPrefix(err.Error(), "flag: "))
	}
	if h, _ := fs.GetBool("help"); h {
		printUsage(e.stdout, c, fs)
		return errHelp
	}
	p, _ := fs.GetBool("progress")
	np, _ := fs.GetBool("no-progress")
	switch {
	case p && np:
		return usagef("--progress and --no-progress contradict each other")
	case p:
		e.progress = true
	case np:
		e.progress = false
	}
	if missing := missingRequired(fs); len(missing) > 0 {
		return usagef("missing %s", strings.Join(missing, " and "))
	}
	pos := fs.Args()
	switch {
	case len(pos) < c.lo:
		return usagef("missing %s", strings.Join(positionalNames(c.args)[len(pos):c.lo], " "))
	case c.hi >= 0 && len(pos) > c.hi:
		return usagef("unexpected arguments %q", pos[c.hi:])
	}
	return runner(e, pos)
}

// gnuArgs rewrites the old single-dash long flags (-origin PATH) to the
// GNU form (--origin PATH) when the name is a long flag of fs, so command
// lines written for earlier releases still work. Arguments after "--" are
// left alone.
func gnuArgs(fs *pflag.FlagSet, args []string) []string {
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' {
			name, _, _ := strings.Cut(a[1:], "=")
			if len(name) > 1 && fs.Lookup(name) != nil {
				a = "-" + a
			}
		}
		out = append(out, a)
	}
	return out
}

// requiredAnnotation marks a flag the command cannot run without.
const requiredAnnotation = "blocksnap_required"

func required(fs *pflag.FlagSet, names ...string) {
	for _, n := range names {
		if err := fs.SetAnnotation(n, requiredAnnotation, []string{"true"}); err != nil {
			panic(err) // a typo in a flag name: caught by every test of the command
		}
	}
}

func isRequired(f *pflag.Flag) bool { return len(f.Annotations[requiredAnnotation]) > 0 }

// missingRequired lists the required flags not given, in definition order.
func missingRequired(fs *pflag.FlagSet) []string {
	var out []string
	fs.VisitAll(func(f *pflag.Flag) {
		if isRequired(f) && !f.Changed {
			out = append(out, "--"+f.Name)
		}
	})
	return out
}

// synopsis is the usage line: the positional arguments, each required
// flag with its value name, then [flags] for the rest.
func synopsis(c *command, fs *pflag.FlagSet) string {
	parts := []string{"blocksnap", c.name}
	if c.args != "" {
		parts = append(parts, c.args)
	}
	fs.VisitAll(func(f *pflag.Flag) {
		if isRequired(f) {
			v, _ := pflag.UnquoteUsage(f)
			parts = append(parts, "--"+f.Name+" "+v)
		}
	})
	return strings.Join(append(parts, "[flags]"), " ")
}

func printUsage(w io.Writer, c *command, fs *pflag.FlagSet) {
	fmt.Fprintf(w, "Usage: %s\n\n%s\n", synopsis(c, fs), c.summary)
	if c.long != "" {
		fmt.Fprintf(w, "\n%s\n", c.long)
	}
	fmt.Fprintf(w, "\nFlags:\n%s", fs.FlagUsages())
	if len(c.examples) > 0 {
		fmt.Fprintf(w, "\nExamples:\n  %s\n", strings.Join(c.examples, "\n  "))
	}
}

// positionalNames returns the positional arguments a synopsis names: its
// upper-case words, brackets removed.
func positionalNames(synopsis string) []string {
	var out []string
	for _, w := range strings.Fields(synopsis) {
		w = strings.Trim(w, "[]")
		if w != "" && w == strings.ToUpper(w) && !strings.HasPrefix(w, "-") {
			out = append(out, w)
		}
	}
	for len(out) < 8 {
		out = append(out, "ARG")
	}
	return out
}

// oneLine folds a multi-line message onto one line.
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func topUsage(w io.Writer) {
	fmt.Fprint(w, `blocksnap: block snapshots, clones and diffs from the command line

Usage: blocksnap COMMAND [ARGS] [flags]   (blocksnap COMMAND --help for its flags)

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, `
Sizes take binary units (64KiB, 1.5GiB); flags are --long (GNU style).
Exit status: 0 success, 1 failure, 2 bad usage, 70 internal error.
`)
}

var cmdVersion = &command{
	name:    "version",
	summary: "print the version of blocksnap and of the Go toolchain that built it (also: blocksnap --version)",
	define: func(fs *pflag.FlagSet) func(*env, []string) error {
		return func(e *env, _ []string) error {
			_, err := fmt.Fprintln(e.stdout, version())
			return err
		}
	},
}

// version describes the build from the binary's build information: the
// module version (a tag, a pseudo-version, or "(devel)" for a build in the
// source tree), the VCS revision when the build recorded it, and Go's
// version.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "blocksnap (no build information) " + runtime.Version()
	}
	s := "blocksnap " + bi.Main.Version
	var rev, when, dirty string
	for _, kv := range bi.Settings {
		switch kv.Key {
		case "vcs.revision":
			rev = kv.Value
		case "vcs.time":
			when = kv.Value
		case "vcs.modified":
			if kv.Value == "true" {
				dirty = "+dirty"
			}
		}
	}
	if rev != "" {
		s += fmt.Sprintf(" (%.12s%s %s)", rev, dirty, when)
	}
	return s + " " + bi.GoVersion + " " + runtime.GOOS + "/" + runtime.GOARCH
}
