package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Client talks to the control socket at one path. Each call is one
// connection, so a Client is safe for concurrent use and holds nothing
// open between calls.
type Client struct {
	path string
	// DialTimeout bounds connecting; 0 means 5 s.
	DialTimeout time.Duration
}

// Dial returns a client for the socket at path. It does not connect: the
// first call does (and fails with ErrNoServer when nothing answers).
func Dial(path string) *Client { return &Client{path: path} }

// Path is the socket's path.
func (c *Client) Path() string { return c.path }

func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	t := c.DialTimeout
	if t == 0 {
		t = 5 * time.Second
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, t)
	defer cancel()
	conn, err := d.DialContext(dctx, "unix", c.path)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %v", ErrNoServer, c.path, err)
	}
	return conn, nil
}

// send connects, writes r, and returns the connection (closed when ctx
// ends) and a reader positioned after the answer line, and the answer.
func (c *Client) send(ctx context.Context, r Request) (net.Conn, *bufio.Reader, Response, func(), error) {
	if err := r.Validate(); err != nil {
		return nil, nil, Response{}, nil, err
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, nil, Response{}, nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	done := func() {
		stop()
		conn.Close()
	}
	b, err := json.Marshal(r)
	if err == nil {
		_, err = conn.Write(append(b, '\n'))
	}
	if err != nil {
		done()
		return nil, nil, Response{}, nil, c.wrap(ctx, err)
	}
	br := bufio.NewReaderSize(conn, 16<<10) // answers longer than this grow ReadBytes's result, not the buffer
	line, err := br.ReadBytes('\n')
	if err != nil {
		done()
		if errors.Is(err, io.EOF) {
			err = errors.New("connection closed before an answer")
		}
		return nil, nil, Response{}, nil, c.wrap(ctx, err)
	}
	resp, err := DecodeResponse(line)
	if err != nil {
		done()
		return nil, nil, Response{}, nil, err
	}
	if !resp.OK {
		done()
		return nil, nil, resp, nil, &Error{Op: r.Op, Code: resp.Code, Message: resp.Error}
	}
	return conn, br, resp, done, nil
}

func (c *Client) wrap(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

// Call sends r and decodes its result into out (nil: discard it). A
// failure the server answered is an *Error.
func (c *Client) Call(ctx context.Context, r Request, out any) error {
	if r.Op == OpExportDiff {
		return fmt.Errorf("control: %s answers a stream: use CallStream", r.Op)
	}
	_, _, resp, done, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	done()
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(resp.Result, out); err != nil {
		return fmt.Errorf("%w: %s result: %v", ErrBadAnswer, r.Op, err)
	}
	return nil
}

// CallStream sends r, whose answer is a byte stream, and returns the
// stream. The caller reads it to the end and closes it; a stream the
// server could not finish ends early (its format must detect that).
func (c *Client) CallStream(ctx context.Context, r Request) (io.ReadCloser, error) {
	_, br, _, done, err := c.send(ctx, r)
	if err != nil {
		return nil, err
	}
	return &streamReader{r: br, done: done}, nil
}

type streamReader struct {
	r    io.Reader
	done func()
}

func (s *streamReader) Read(p []byte) (int, error) { return s.r.Read(p) }
func (s *streamReader) Close() error {
	s.done()
	return nil
}

// Info asks who is serving.
func (c *Client) Info(ctx context.Context) (Info, error) {
	return call[Info](ctx, c, Request{Op: OpInfo})
}

// List lists the store's volumes.
func (c *Client) List(ctx context.Context) ([]Volume, error) {
	return call[[]Volume](ctx, c, Request{Op: OpList})
}

// Usage returns the store's space summary.
func (c *Client) Usage(ctx context.Context) (Space, error) {
	return call[Space](ctx, c, Request{Op: OpUsage})
}

// Stat returns a volume's space accounting.
func (c *Client) Stat(ctx context.Context, name string) (VolumeStat, error) {
	return call[VolumeStat](ctx, c, Request{Op: OpStat, Name: name})
}

// Snapshot takes a snapshot called name of the volume of ("" : origin).
func (c *Client) Snapshot(ctx context.Context, name, of string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpSnapshot, Name: name, Of: of})
}

// Clone makes a writable clone called name of the snapshot from.
func (c *Client) Clone(ctx context.Context, name, from string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpClone, Name: name, From: from})
}

// Delete deletes a volume; wait: answer once its space is reclaimed.
func (c *Client) Delete(ctx context.Context, name string, wait bool) (DeleteResult, error) {
	return call[DeleteResult](ctx, c, Request{Op: OpDelete, Name: name, Wait: wait})
}

// ForceDelete deletes a volume even while NBD clients are connected to it,
// closing their connections (Delete refuses it with ErrBusy).
func (c *Client) ForceDelete(ctx context.Context, name string, wait bool) (DeleteResult, error) {
	return call[DeleteResult](ctx, c, Request{Op: OpDelete, Name: name, Wait: wait, Force: true})
}

// Protect makes deletes refuse the volume name until Unprotect.
func (c *Client) Protect(ctx context.Context, name string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpProtect, Name: name})
}

// Unprotect lifts Protect.
func (c *Client) Unprotect(ctx context.Context, name string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpUnprotect, Name: name})
}

// Rename renames a volume.
func (c *Client) Rename(ctx context.Context, name, newName string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpRename, Name: name, NewName: newName})
}

// Rollback reverts the volume name to its snapshot to.
func (c *Client) Rollback(ctx context.Context, name, to string) (Volume, error) {
	return call[Volume](ctx, c, Request{Op: OpRollback, Name: name, To: to})
}

// Diff lists the extents that differ between from and to ("": the live
// volume from was taken of).
func (c *Client) Diff(ctx context.Context, from, to string) (Diff, error) {
	return call[Diff](ctx, c, Request{Op: OpDiff, From: from, To: to})
}

// ExportDiff streams the diff stream of snapshot to (incremental from the
// snapshot from, or full when from is empty); compress: zstd-compressed
// (stream version 2).
func (c *Client) ExportDiff(ctx context.Context, from, to string, compress bool) (io.ReadCloser, error) {
	return c.CallStream(ctx, Request{Op: OpExportDiff, From: from, To: to, Compress: compress})
}

// Check checks the live store's metadata.
func (c *Client) Check(ctx context.Context) (CheckReport, error) {
	return call[CheckReport](ctx, c, Request{Op: OpCheck})
}

// Dump returns the live store's metadata.
func (c *Client) Dump(ctx context.Context) (Dump, error) {
	return call[Dump](ctx, c, Request{Op: OpDump})
}

// Status returns a running hydrate's status.
func (c *Client) Status(ctx context.Context) (CloneStatus, error) {
	return c.cloneOp(ctx, Request{Op: OpStatus})
}

// Pause pauses background hydration (user I/O still hydrates what it
// touches).
func (c *Client) Pause(ctx context.Context) (CloneStatus, error) {
	return c.cloneOp(ctx, Request{Op: OpPause})
}

// Resume resumes background hydration.
func (c *Client) Resume(ctx context.Context) (CloneStatus, error) {
	return c.cloneOp(ctx, Request{Op: OpResume})
}

// SetRate caps background hydration at bytesPerSecond (0: no cap).
func (c *Client) SetRate(ctx context.Context, bytesPerSecond int64) (CloneStatus, error) {
	return c.cloneOp(ctx, Request{Op: OpSetRate, Rate: bytesPerSecond})
}

func (c *Client) cloneOp(ctx context.Context, r Request) (CloneStatus, error) {
	return call[CloneStatus](ctx, c, r)
}

// call sends r and returns its result as a T.
func call[T any](ctx context.Context, c *Client, r Request) (T, error) {
	var out T
	err := c.Call(ctx, r, &out)
	return out, err
}
