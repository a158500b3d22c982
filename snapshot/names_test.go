package snapshot

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Every call that names a volume refuses a bad name with ErrBadName (an
// ErrBadOptions) and changes nothing; good names, Unicode included, work.
func TestVolumeNames(t *testing.T) {
	s, _, _ := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	snap, err := s.CreateSnapshot("base", s.Origin())
	require.NoError(t, err)
	bad := map[string]string{
		"":                                "empty",
		"a/b":                             "holds a slash",
		"/":                               "holds a slash",
		"tab\there":                       "holds a control character",
		"new\nline":                       "holds a control character",
		"nul\x00":                         "holds a control character",
		"del\x7f":                         "holds a control character",
		"c1\u0085":                        "holds a control character",
		"bad\xffutf8":                     "not UTF-8",
		strings.Repeat("x", MaxNameLen+1): "256 bytes, more than 255",
	}
	create := map[string]func(string) error{
		"snapshot": func(n string) error { return second(s.CreateSnapshot(n, s.Origin())) },
		"clone":    func(n string) error { return second(s.CreateClone(n, snap)) },
		"rename":   func(n string) error { return s.Rename("base", n) },
	}
	for op, f := range create {
		for name, why := range bad {
			err := f(name)
			require.ErrorIs(t, err, ErrBadName, "%s %q", op, name)
			require.ErrorIs(t, err, ErrBadOptions, "%s %q", op, name)
			require.Contains(t, err.Error(), why, "%s %q", op, name)
			require.NotContains(t, err.Error(), "\n", "the message is one line")
		}
	}
	require.Len(t, s.List(), 2, "nothing was created")
	for i, name := range []string{"vm-1", "golden@v1", "дiск ü", "a b", strings.Repeat("y", MaxNameLen)} {
		require.NoError(t, ValidName(name))
		switch i % 3 {
		case 0:
			require.NoError(t, second(s.CreateSnapshot(name, s.Origin())))
		case 1:
			require.NoError(t, second(s.CreateClone(name, snap)))
		default:
			require.NoError(t, s.Rename("base", name))
			require.NoError(t, s.Rename(name, "base"))
		}
	}
	mustCheck(t, s)
}
