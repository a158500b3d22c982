package control

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
)

// Handler answers a request: a result to encode as JSON, a Stream, or an
// error (Classify turns it into a Code). It runs on the connection's
// goroutine; ctx ends when the server closes.
type Handler func(ctx context.Context, r Request) (any, error)

// Stream is a result that is a byte stream: the answer line says OK, the
// stream follows, and the connection closes after it. A Stream that fails
// leaves its output cut short (unflushed), so the receiver's decoder sees a
// truncated stream: the diff stream format detects that.
type Stream func(w io.Writer) error

// Classify maps a handler's error to a Code; nil means CodeFailed for
// every error. Set it before Listen's server answers its first request.
type Classifier func(err error) Code

// Server answers requests on a Unix socket.
type Server struct {
	path     string
	l        net.Listener
	handle   Handler
	classify Classifier
	ctx      context.Context
	cancel   context.CancelFunc

	mu    sync.Mutex // guards conns; nil once Close began
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup // the accept loop and one per connection
}

// Listen serves handle on a Unix socket at path. A socket file left there
// by a process that is gone is replaced; one that answers is an error that
// names the process holding it (from its info answer, when it gives one).
func Listen(path string, handle Handler, classify Classifier) (*Server, error) {
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s is in use%s", path, holderOf(path))
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{path: path, l: l, handle: handle, classify: classify, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// holderOf describes who answers at path, for an error message.
func holderOf(path string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	info, err := Dial(path).Info(ctx)
	if err != nil {
		return " by another process"
	}
	return fmt.Sprintf(" by %s (pid %d)", info.Program, info.PID)
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.conns == nil {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(c)
	}
}

func (s *Server) serve(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), MaxLine)
	enc := json.NewEncoder(c)
	for sc.Scan() {
		resp, st := s.answer(sc.Bytes())
		if st != nil {
			s.stream(c, st)
			return
		}
		if err := enc.Encode(resp); err != nil {
			return
		}
	}
	if errors.Is(sc.Err(), bufio.ErrTooLong) {
		_ = enc.Encode(Response{Code: CodeBadRequest, Error: fmt.Sprintf("bad request: a line longer than %d bytes", MaxLine)})
	}
}

// answer runs one request line.
func (s *Server) answer(line []byte) (Response, Stream) {
	r, err := DecodeRequest(line)
	if err != nil {
		return Response{Code: CodeBadRequest, Error: err.Error()}, nil
	}
	res, err := s.handle(s.ctx, r)
	if err != nil {
		code := CodeFailed
		if s.classify != nil {
			code = s.classify(err)
		}
		return Response{Code: code, Error: oneLine(err.Error())}, nil
	}
	if st, ok := res.(Stream); ok {
		return Response{}, st
	}
	b, err := json.Marshal(res)
	if err != nil {
		return Response{Code: CodeFailed, Error: oneLine(err.Error())}, nil
	}
	return Response{OK: true, Result: b}, nil
}

func (s *Server) stream(c net.Conn, st Stream) {
	bw := bufio.NewWriterSize(c, 1<<20)
	if err := json.NewEncoder(bw).Encode(Response{OK: true}); err != nil {
		return
	}
	if err := st(bw); err != nil {
		return // the tail stays unflushed: the receiver sees a truncated stream
	}
	bw.Flush()
}

// Close stops accepting, closes every connection (a request running
// finishes first: its handler's ctx is cancelled), waits for the
// connection goroutines and removes the socket file.
func (s *Server) Close() error {
	s.cancel()
	err := s.l.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.conns = nil
	s.mu.Unlock()
	s.wg.Wait()
	os.Remove(s.path)
	return err
}
