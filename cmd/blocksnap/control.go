package main

// The control socket of `blocksnap serve` (and of `blocksnap hydrate`): a
// Unix stream socket speaking line-oriented JSON. Each request is one JSON
// object on one line (see request); each answer is one line:
//
//	{"ok":true,"result":...}
//	{"ok":false,"error":"one-line message"}
//
// A connection may carry many requests, answered in order. Lines are at
// most 64 KiB.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
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
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			resp.Error = "bad request: " + err.Error()
		} else if res, err := cs.handle(cs.ctx, r); err != nil {
			resp.Error = oneLine(err.Error())
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
