package snapshot

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxNameLen is the longest volume name, in bytes.
const MaxNameLen = maxNameLen

// ErrBadName is returned (wrapped, with the name and the reason) by every
// call that names a new volume or renames one, for a name that is not
// valid. It wraps ErrBadOptions.
var ErrBadName = fmt.Errorf("%w: bad volume name", ErrBadOptions)

// ValidName reports why name cannot name a volume, or nil. A name is 1 to
// MaxNameLen bytes of UTF-8 with no slash (names become NBD export names,
// URI paths and file names of tools built on the store) and no control
// character (they are printed on one line, in tables and logs). Names
// stored before these rules were kept as they are: only new names and
// renames are checked.
func ValidName(name string) error {
	var why string
	switch {
	case name == "":
		why = "empty"
	case len(name) > maxNameLen:
		why = fmt.Sprintf("%d bytes, more than %d", len(name), maxNameLen)
	case !utf8.ValidString(name):
		why = "not UTF-8"
	case strings.ContainsRune(name, '/'):
		why = "holds a slash"
	case strings.ContainsFunc(name, unicode.IsControl):
		why = "holds a control character"
	default:
		return nil
	}
	if len(name) > 64 {
		name = name[:64] + "..."
	}
	return fmt.Errorf("%w %q: %s (1 to %d bytes of UTF-8, no slash, no control character)", ErrBadName, name, why, maxNameLen)
}
