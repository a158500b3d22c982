// Command blocksnap operates blocksnap snapshot stores, ships incremental
// diffs between snapshots, serves volumes over NBD and runs clone targets
// from the command line.
//
// Usage:
//
//	blocksnap COMMAND [flags] [args]
//	blocksnap COMMAND --help
//
// Store commands take --origin PATH --store PATH (regular files or block
// device nodes):
//
//	format      create a store for an origin (--size creates missing files)
//	snapshot    take a read-only snapshot of the origin or of a clone
//	clone       make a writable clone of a snapshot
//	list        list volumes
//	delete      delete a snapshot or clone and reclaim its space
//	rollback    revert the origin or a clone to one of its snapshots
//	stat        space accounting of a volume (mapped, exclusive, shared)
//	check       verify the store's metadata
//	dump        print the store's metadata as JSON
//	diff        list the extents that changed between two volumes
//	export-diff write a diff stream (full or incremental)
//	apply-diff  apply a diff stream onto a file or device
//	serve       export every volume over NBD, with a control socket
//
// Clone target commands:
//
//	hydrate     hydrate a destination from a source (a file or nbd:// URI)
//	status      show a clone's hydration status
//
// Exit status: 0 success, 1 failure, 2 bad usage. Errors go to standard
// error on one line. Progress is shown on standard error when it is a
// terminal.
//
// The store is locked (flock) while a command uses it. While `serve` holds
// it, snapshot, clone, delete, list, stat, diff and export-diff act on the
// live server through its control socket (a Unix socket, default
// STORE.control; the protocol is described in control.go).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// env is what a command runs with: the streams and a context that ends
// on SIGINT or SIGTERM.
type env struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// tty reports whether stderr is a terminal (progress is shown then).
	tty bool
}

// command is one subcommand.
type command struct {
	name    string
	args    string // synopsis after the name
	summary string
	run     func(e *env, args []string) error
}

var commands []*command

func init() {
	commands = []*command{
		cmdFormat, cmdSnapshot, cmdClone, cmdList, cmdDelete, cmdRollback, cmdStat,
		cmdCheck, cmdDump, cmdDiff, cmdExportDiff, cmdApplyDiff, cmdServe,
		cmdHydrate, cmdStatus,
		cmdBackup, cmdRestore, cmdArchive,
	}
}

// usageError is bad usage: exit status 2.
type usageError struct{ msg string }

func (u *usageError) Error() string { return u.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	e := &env{ctx: ctx, stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, tty: isTerminal(os.Stderr)}
	code := run(e, os.Args[1:])
	stop()
	os.Exit(code)
}

// run executes the command line and returns the exit status.
func run(e *env, args []string) int {
	if len(args) == 0 {
		topUsage(e.stderr)
		return 2
	}
	name := args[0]
	if name == "-h" || name == "--help" || name == "help" {
		topUsage(e.stdout)
		return 0
	}
	var c *command
	for _, x := range commands {
		if x.name == name {
			c = x
		}
	}
	if c == nil {
		fmt.Fprintf(e.stderr, "blocksnap: unknown command %q (see blocksnap --help)\n", name)
		return 2
	}
	err := c.run(e, args[1:])
	var ue *usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "blocksnap %s: %s (see blocksnap %s --help)\n", c.name, oneLine(ue.msg), c.name)
		return 2
	}
	fmt.Fprintf(e.stderr, "blocksnap %s: %s\n", c.name, oneLine(err.Error()))
	return 1
}

// oneLine folds a multi-line message onto one line.
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func topUsage(w io.Writer) {
	fmt.Fprint(w, `blocksnap: block snapshots, clones and diffs from the command line

Usage: blocksnap COMMAND [flags] [args]   (blocksnap COMMAND --help for its flags)

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, `
Exit status: 0 success, 1 failure, 2 bad usage.
`)
}

// newFlags returns a flag set for c whose --help prints c's usage.
func newFlags(e *env, c *command) *flag.FlagSet {
	fs := flag.NewFlagSet("blocksnap "+c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parse parses flags and positional arguments in any order (flags may
// follow positionals, as in `snapshot NAME --of VOL`) and checks the count
// of positionals is in [lo, hi] (hi < 0: no limit).
func parse(e *env, c *command, fs *flag.FlagSet, args []string, lo, hi int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printUsage(e.stdout, c, fs)
				return nil, flag.ErrHelp
			}
			return nil, usagef("%v", err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	switch {
	case len(pos) < lo:
		return nil, usagef("missing %s", strings.Join(positionalNames(c.args)[len(pos):lo], " "))
	case hi >= 0 && len(pos) > hi:
		return nil, usagef("unexpected arguments %q", pos[hi:])
	}
	return pos, nil
}

func printUsage(w io.Writer, c *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: blocksnap %s %s\n\n%s\n\nFlags:\n", c.name, c.args, c.summary)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// positionalNames returns the positional arguments a synopsis names: its
// upper-case words outside brackets and flags.
func positionalNames(synopsis string) []string {
	var out []string
	prevFlag := false
	for _, w := range strings.Fields(synopsis) {
		isFlag := strings.HasPrefix(w, "-") || strings.HasPrefix(w, "[")
		if !isFlag && !prevFlag && !strings.Contains(w, "]") && w == strings.ToUpper(w) {
			out = append(out, w)
		}
		prevFlag = isFlag
	}
	for len(out) < 8 {
		out = append(out, "ARG")
	}
	return out
}
