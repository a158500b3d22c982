package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/control"
	"github.com/blocksnap/blocksnap/snapshot"
)

// libraryPackages are the packages whose errors start with their name
// ("snapshot: bad options: ..."): that says where in the code an error
// came from, which an operator does not need, so message drops it.
var libraryPackages = map[string]bool{
	"snapshot": true, "clone": true, "exception": true, "journal": true,
	"blockdev": true, "diffstream": true, "nbd": true, "control": true, "archive": true,
}

// message is err as the command prints it: on one line, without the
// library package prefixes (and the "bad options" that follows one) at the
// start of any of its ": "-separated parts.
func message(err error) string {
	parts := strings.Split(oneLine(err.Error()), ": ")
	out := parts[:0]
	dropped := false
	for i, p := range parts {
		last := i == len(parts)-1
		switch {
		case !last && libraryPackages[p]:
			dropped = true
			continue
		case !last && dropped && p == "bad options":
			dropped = false
			continue
		}
		dropped = false
		out = append(out, p)
	}
	return strings.Join(out, ": ")
}

// ownerHeld is the error for a store whose owner record names a holder
// the flock cannot see (another host sharing the device).
func ownerHeld(what, path string, oe *snapshot.OwnerError) error {
	return fmt.Errorf("%s %s is held by pid %d on host %q since %s (its owner record): add --take-over only once that process is known to be gone",
		what, path, oe.PID, oe.Host, oe.Since.UTC().Format(time.RFC3339))
}

// inUse is the error for a path another process holds: it names the
// holder when a control socket at control answers (the program, its PID)
// and says what to do (todo: the advice for this command).
func inUse(ctx context.Context, what, path, socket, todo string, cause error) error {
	if oe := (*snapshot.OwnerError)(nil); errors.As(cause, &oe) {
		return ownerHeld(what, path, oe)
	}
	ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := control.Dial(socket).Info(ictx)
	if err != nil {
		holder := "find the holder with: fuser -v " + path
		if le := (*blockdev.LockedError)(nil); errors.As(cause, &le) && len(le.Holders) > 0 {
			holder = heldBy(le)
		}
		return fmt.Errorf("%s %s is in use by another process, and no control socket answers at %s (%s)", what, path, socket, holder)
	}
	msg := fmt.Sprintf("%s %s is in use by %s (pid %d, control socket %s)", what, path, info.Program, info.PID, info.Control)
	if todo != "" {
		msg += "; " + strings.ReplaceAll(todo, "PID", fmt.Sprint(info.PID))
	}
	return errors.New(msg)
}

// classify maps an error of the store to the control protocol's codes.
func classify(err error) control.Code {
	switch {
	case errors.Is(err, snapshot.ErrNotFound):
		return control.CodeNotFound
	case errors.Is(err, snapshot.ErrExists):
		return control.CodeExists
	case errors.Is(err, snapshot.ErrNoSpace):
		return control.CodeNoSpace
	case errors.Is(err, snapshot.ErrBadOptions), errors.Is(err, errNotSnapshot),
		errors.Is(err, snapshot.ErrProtected), errors.Is(err, snapshot.ErrHasDependants):
		return control.CodeInvalid
	case errors.Is(err, errBusy):
		return control.CodeBusy
	}
	return control.CodeFailed
}

// errBusy: a volume that NBD clients are connected to is not deleted
// without --force.
var errBusy = errors.New("volume is in use")
