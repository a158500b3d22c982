package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var errMissing = errors.New("missing")

// testServer answers with a small in-memory model of a store.
func testServer(t *testing.T) (*Server, *Client) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.sock")
	vols := map[string]Volume{"origin": {ID: 1, Name: "origin", Kind: "origin", Size: 1 << 20}}
	handle := func(ctx context.Context, r Request) (any, error) {
		switch r.Op {
		case OpInfo:
			return Info{Program: "test", PID: os.Getpid(), Control: path}, nil
		case OpSnapshot:
			if _, ok := vols[r.Name]; ok {
				return nil, fmt.Errorf("name %q is taken", r.Name)
			}
			v := Volume{ID: uint64(len(vols) + 1), Name: r.Name, Kind: "snapshot", Parent: "origin"}
			vols[r.Name] = v
			return v, nil
		case OpStat:
			v, ok := vols[r.Name]
			if !ok {
				return nil, fmt.Errorf("%w: %q", errMissing, r.Name)
			}
			return VolumeStat{Volume: v, Mapped: 4096}, nil
		case OpExportDiff:
			return Stream(func(w io.Writer) error {
				_, err := io.WriteString(w, "stream of "+r.To)
				return err
			}), nil
		}
		return nil, fmt.Errorf("unsupported %s", r.Op)
	}
	classify := func(err error) Code {
		if errors.Is(err, errMissing) {
			return CodeNotFound
		}
		return CodeFailed
	}
	s, err := Listen(path, handle, classify)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s, Dial(path)
}

func TestClientServer(t *testing.T) {
	s, c := testServer(t)
	ctx := context.Background()

	info, err := c.Info(ctx)
	require.NoError(t, err)
	require.Equal(t, os.Getpid(), info.PID)

	v, err := c.Snapshot(ctx, "s1", "")
	require.NoError(t, err)
	require.Equal(t, Volume{ID: 2, Name: "s1", Kind: "snapshot", Parent: "origin"}, v)
	_, err = c.Snapshot(ctx, "s1", "")
	var ce *Error
	require.ErrorAs(t, err, &ce)
	require.Equal(t, CodeFailed, ce.Code)
	require.Equal(t, `name "s1" is taken`, ce.Message)

	st, err := c.Stat(ctx, "s1")
	require.NoError(t, err)
	require.Equal(t, int64(4096), st.Mapped)
	_, err = c.Stat(ctx, "nope")
	require.ErrorIs(t, err, ErrNotFound)

	rc, err := c.ExportDiff(ctx, "", "s1", false)
	require.NoError(t, err)
	b, err := io.ReadAll(rc)
	require.NoError(t, err)
	require.NoError(t, rc.Close())
	require.Equal(t, "stream of s1", string(b))

	// A request the client itself can tell is bad is not sent.
	_, err = c.Stat(ctx, "")
	var re *RequestError
	require.ErrorAs(t, err, &re)
	require.ErrorContains(t, c.Call(ctx, Request{Op: OpExportDiff, To: "s1"}, nil), "use CallStream")

	// A second server on the same socket names the first.
	_, err = Listen(s.Path(), nil, nil)
	require.ErrorContains(t, err, fmt.Sprintf("is in use by test (pid %d)", os.Getpid()))

	require.NoError(t, s.Close())
	_, err = os.Stat(s.Path())
	require.True(t, os.IsNotExist(err), "Close removes the socket file")
	_, err = c.Info(ctx)
	require.ErrorIs(t, err, ErrNoServer)
}

// Raw lines a client could send: every bad one gets a bad-request answer
// on the same connection, which stays usable.
func TestServerRefusesBadLines(t *testing.T) {
	s, _ := testServer(t)
	conn, err := net.Dial("unix", s.Path())
	require.NoError(t, err)
	defer conn.Close()
	br := bufio.NewReader(conn)
	ask := func(line string) Response {
		_, err := io.WriteString(conn, line+"\n")
		require.NoError(t, err)
		l, err := br.ReadBytes('\n')
		require.NoError(t, err)
		r, err := DecodeResponse(l)
		require.NoError(t, err)
		return r
	}
	for _, line := range []string{
		`not json`,
		`{"op":"frobnicate"}`,
		`{"op":"stat"}`,
		`{"op":"stat","name":"a","extra":1}`,
		`{"op":"stat","name":"a"} {"op":"list"}`,
		`{"op":"clone","name":"a"}`,
		`{"op":"stat","name":"a\u0000b"}`,
		`{"op":"set-rate","rate":-1}`,
		`{"op":"stat","name":"` + strings.Repeat("x", MaxName+1) + `"}`,
		`[]`,
	} {
		r := ask(line)
		require.False(t, r.OK, line)
		require.Equal(t, CodeBadRequest, r.Code, line)
		require.True(t, strings.HasPrefix(r.Error, "bad request: "), r.Error)
	}
	r := ask(`{"op":"info"}`)
	require.True(t, r.OK)

	// A line over the limit ends the connection with an answer saying so.
	_, err = io.WriteString(conn, strings.Repeat("x", MaxLine+10)+"\n")
	require.NoError(t, err)
	l, err := br.ReadBytes('\n')
	require.NoError(t, err)
	resp, err := DecodeResponse(l)
	require.NoError(t, err)
	require.Contains(t, resp.Error, "longer than")
	_, err = br.ReadBytes('\n')
	require.Error(t, err, "the server closed the connection (EOF, or a reset: our unread bytes)")
}

// Close while a client holds an idle connection open returns (the
// connection goroutine is stopped and waited for).
func TestServerCloseWithIdleConnection(t *testing.T) {
	s, _ := testServer(t)
	conn, err := net.Dial("unix", s.Path())
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, `{"op":"info"}`+"\n")
	require.NoError(t, err)
	_, err = bufio.NewReader(conn).ReadBytes('\n')
	require.NoError(t, err)
	require.NoError(t, s.Close())
	_, err = conn.Read(make([]byte, 1))
	require.Error(t, err)
}

func TestDecodeResponse(t *testing.T) {
	_, err := DecodeResponse([]byte(`{"ok":false}`))
	require.ErrorIs(t, err, ErrBadAnswer)
	_, err = DecodeResponse([]byte(`garbage`))
	require.ErrorIs(t, err, ErrBadAnswer)
	r, err := DecodeResponse([]byte(`{"ok":false,"code":"exists","error":"taken"}`))
	require.NoError(t, err)
	require.ErrorIs(t, &Error{Code: r.Code, Message: r.Error}, ErrExists)
}
