package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// listen opens the role's HTTP listener early, so that a port conflict fails
// the start instead of a running process, and answers on it at once, while
// the process still waits for Redis or PostgreSQL (or starts them):
// /healthz 200, so that a liveness probe does not kill a process that waits
// out an outage, and everything else 503 "starting". The role's server
// takes the listener over with its first Accept.
func listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s (HTTP_ADDR): %w", addr, err)
	}
	return answerEarly(ln), nil
}

// answerEarly answers on ln until the role's server takes it over (see
// listen).
func answerEarly(ln net.Listener) *earlyListener {
	l := &earlyListener{
		Listener: ln,
		conns:    make(chan net.Conn),
		handed:   make(chan net.Conn),
		failed:   make(chan struct{}),
		closed:   make(chan struct{}),
		takeover: make(chan struct{}),
	}
	go l.acceptLoop()
	starting := &http.Server{Handler: http.HandlerFunc(answerStarting), ReadHeaderTimeout: 10 * time.Second}
	// One request per connection: a kept-alive one would stay with this
	// server after the takeover.
	starting.SetKeepAlivesEnabled(false)
	go func() { _ = starting.Serve(startingListener{l}) }()
	return l
}

// answerStarting answers the requests that arrive before the role's server
// runs.
func answerStarting(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if r.URL.Path == "/healthz" {
		w.WriteHeader(http.StatusOK)
		_ = json.NewEncoder(w).Encode(map[string]string{"status": "ok"})
		return
	}
	w.Header().Set("Retry-After", "1")
	w.WriteHeader(http.StatusServiceUnavailable)
	if r.URL.Path == "/readyz" {
		_ = json.NewEncoder(w).Encode(map[string]string{"status": "starting"})
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{
		"code": "starting", "message": "the server is starting; retry shortly",
	}})
}

// earlyListener hands the connections of its listener to the starting
// server until the role's server calls Accept, then to that one alone.
type earlyListener struct {
	net.Listener
	conns    chan net.Conn
	handed   chan net.Conn // a connection the starting server took after the takeover
	err      error         // why the listener failed, once failed is closed
	failed   chan struct{} // closed when the listener's Accept failed
	closed   chan struct{} // closed by Close
	takeover chan struct{} // closed by the role server's first Accept
	once     struct{ close, takeover sync.Once }
}

func (l *earlyListener) acceptLoop() {
	var wait time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil && !errors.Is(err, net.ErrClosed) {
			// Out of file descriptors, say: passing, as http.Server
			// treats it, so retried after a pause.
			wait = min(max(2*wait, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(wait):
				continue
			case <-l.closed:
			}
		}
		if err != nil {
			l.err = err
			close(l.failed)
			return
		}
		wait = 0
		select {
		case l.conns <- c:
		case <-l.closed:
			_ = c.Close()
			return
		}
	}
}

// Accept is the role server's.
func (l *earlyListener) Accept() (net.Conn, error) {
	l.once.takeover.Do(func() { close(l.takeover) })
	select {
	case c := <-l.conns:
		return c, nil
	case c := <-l.handed:
		return c, nil
	case <-l.failed:
		return nil, l.err
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *earlyListener) Close() error {
	var err error
	l.once.close.Do(func() {
		close(l.closed)
		err = l.Listener.Close()
	})
	return err
}

// startingListener is the starting server's view: it ends at the takeover.
type startingListener struct{ l *earlyListener }

func (s startingListener) Accept() (net.Conn, error) {
	select {
	case c := <-s.l.conns:
		select {
		case <-s.l.takeover:
			// Taken in the instant of the takeover: the role's server
			// answers it, not "starting".
			go func() {
				select {
				case s.l.handed <- c:
				case <-s.l.closed:
					_ = c.Close()
				}
			}()
			return nil, net.ErrClosed
		default:
			return c, nil
		}
	case <-s.l.takeover:
		return nil, net.ErrClosed
	case <-s.l.failed:
		return nil, s.l.err
	case <-s.l.closed:
		return nil, net.ErrClosed
	}
}

func (s startingListener) Close() error   { return nil } // the role's server owns the listener
func (s startingListener) Addr() net.Addr { return s.l.Addr() }
