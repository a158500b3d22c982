package main

// The control socket of `blocksnap serve` (and of `blocksnap hydrate`): a
// Unix stream socket speaking line-oriented JSON. Each request is one JSON
// object on one line (see request); each answer is one line:
//
//	{"ok":true,"result":...}
//	{"ok":false,"error":"one-line message"}
//
// A connection may carry many requests, answered in order. Lines are at
// most 64 KiB. One answer is a byte stream: {"op":"export-diff"} is
// answered {"ok":true}, then the diff stream, then the connection closes
// (a stream cut short is detected by the diff stream's reader).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/blocksnap/blocksnap/snapshot/diffstream"
)

type response struct {
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

const maxControlLine = 64 << 10

// controlServer answers requests on a Unix socket with handle.
type controlServer struct {
	path   string
	l      net.Listener
	handle func(ctx context.Context, r request) (any, error)
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex // guards conns
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup // the accept loop and one per connection
}

// listenControl listens on path. A socket file left there by a process
// that is gone is replaced; one that answers is an error.
func listenControl(path string, handle func(context.Context, request) (any, error)) (*controlServer, error) {
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s is in use by another process", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cs := &controlServer{path: path, l: l, handle: handle, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	cs.wg.Add(1)
	go cs.accept()
	return cs, nil
}

func (cs *controlServer) accept() {
	defer cs.wg.Done()
	for {
		c, err := cs.l.Accept()
		if err != nil {
			return
		}
		cs.mu.Lock()
		if cs.conns == nil { // closing
			cs.mu.Unlock()
			c.Close()
			return
		}
		cs.conns[c] = struct{}{}
		cs.wg.Add(1)
		cs.mu.Unlock()
		go cs.serve(c)
	}
}

func (cs *controlServer) serve(c net.Conn) {
	defer cs.wg.Done()
	defer func() {
		cs.mu.Lock()
		delete(cs.conns, c)
		cs.mu.Unlock()
		c.Close()
	}()
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), maxControlLine)
	enc := json.NewEncoder(c)
	for sc.Scan() {
		var r request
		var resp response
		var res any
		var err error
		if err = json.Unmarshal(sc.Bytes(), &r); err != nil {
			resp.Error = "bad request: " + err.Error()
		} else if res, err = cs.handle(cs.ctx, r); err != nil {
			resp.Error = oneLine(err.Error())
		} else if st, ok := res.(streamer); ok {
			cs.stream(c, st)
			return
		} else if b, err := json.Marshal(res); err != nil {
			resp.Error = err.Error()
		} else {
			resp.OK, resp.Result = true, b
		}
		if err := enc.Encode(resp); err != nil {
			return
		}
	}
}

// streamer is a result that is a byte stream: the answer line says ok,
// the stream follows, and the connection closes after it. A failure while
// streaming shows as a stream that ends early (the diff stream's reader
// detects it).
type streamer func(w io.Writer) error

func (cs *controlServer) stream(c net.Conn, st streamer) {
	bw := bufio.NewWriterSize(c, 1<<20)
	if err := json.NewEncoder(bw).Encode(response{OK: true}); err != nil {
		return
	}
	if err := st(bw); err != nil {
		return // close without flushing the tail: the receiver sees a truncated stream
	}
	bw.Flush()
}

// close stops accepting, closes every connection (requests running finish
// first, as the handler returns) and removes the socket file.
func (cs *controlServer) close() {
	cs.cancel()
	cs.l.Close()
	cs.mu.Lock()
	for c := range cs.conns {
		c.Close()
	}
	cs.conns = nil
	cs.mu.Unlock()
	cs.wg.Wait()
	os.Remove(cs.path)
}

// callControlStream sends r, whose answer is a diff stream, and copies the
// stream to w, verifying it on the way (a stream the server could not
// finish is an error here). progress gets the bytes received so far.
func callControlStream(ctx context.Context, path string, r request, w io.Writer, progress func(int64)) (diffstream.Totals, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := d.DialContext(dctx, "unix", path)
	cancel()
	if err != nil {
		return diffstream.Totals{}, fmt.Errorf("%w at %s: %v", errNoServer, path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if err := json.NewEncoder(c).Encode(r); err != nil {
		return diffstream.Totals{}, fmt.Errorf("control socket %s: %w", path, err)
	}
	br := bufio.NewReaderSize(c, 1<<20)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return diffstream.Totals{}, fmt.Errorf("control socket %s: %w", path, err)
	}
	var resp response
	if err := json.Unmarshal(line, &resp); err != nil {
		return diffstream.Totals{}, fmt.Errorf("control socket %s: bad answer: %w", path, err)
	}
	if !resp.OK {
		return diffstream.Totals{}, errors.New(resp.Error)
	}
	cw := &countingWriter{w: w, progress: progress}
	sr, err := diffstream.NewReader(io.TeeReader(br, cw))
	if err != nil {
		return diffstream.Totals{}, fmt.Errorf("stream from the server: %w", err)
	}
	for {
		_, err := sr.Next()
		if errors.Is(err, io.EOF) {
			return sr.Totals(), cw.err
		}
		if err != nil {
			return sr.Totals(), fmt.Errorf("stream from the server: %w", err)
		}
		if cw.err != nil {
			return sr.Totals(), cw.err
		}
	}
}

type countingWriter struct {
	w        io.Writer
	n        int64
	err      error
	progress func(int64)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	if c.progress != nil {
		c.progress(c.n)
	}
	return n, err
}

// callControl sends r to the control socket at path and decodes the
// result into out. errNoServer: nothing listens there.
func callControl(ctx context.Context, path string, r request, out any) error {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := d.DialContext(dctx, "unix", path)
	cancel()
	if err != nil {
		return fmt.Errorf("%w at %s: %v", errNoServer, path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	if err := json.NewEncoder(c).Encode(r); err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), 64<<20)
	if !sc.Scan() {
		err := sc.Err()
		if err == nil {
			err = errors.New("connection closed")
		}
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	var resp response
	if err := json.Unmarshal(sc.Bytes(), &resp); err != nil {
		return fmt.Errorf("control socket %s: bad answer: %w", path, err)
	}
	if !resp.OK {
		return errors.New(resp.Error)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(resp.Result, out)
}
