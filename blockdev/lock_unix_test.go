//go:build unix

package blockdev

import (
	"bufio"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestHoldersIn(t *testing.T) {
	locks := `1: POSIX  ADVISORY  WRITE 812 00:1a:4242 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 fd:01:99 0 EOF
2: -> FLOCK  ADVISORY  WRITE 777 fd:01:99 0 EOF
3: FLOCK  ADVISORY  READ 55 fd:01:99 0 EOF
4: FLOCK  ADVISORY  READ 56 fd:01:990 0 EOF
5: OFDLCK ADVISORY  READ -1 fd:01:99 0 EOF
garbage
6: FLOCK  ADVISORY  READ notapid fd:01:99 0 EOF
`
	got := holdersIn(bufio.NewScanner(strings.NewReader(locks)), "fd:01:99")
	require.Equal(t, []int{1234, 55}, got, "flock holders of that inode only; no waiters, no POSIX or OFD locks")
	require.Empty(t, holdersIn(bufio.NewScanner(strings.NewReader(locks)), "fd:02:99"))
}
