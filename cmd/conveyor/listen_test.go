package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// flakyListener fails its first Accepts as a process out of file
// descriptors does, then accepts.
type flakyListener struct {
	net.Listener
	failures atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// TestEarlyListener: before the role's server takes the listener over, it
// answers /healthz 200 and "starting" elsewhere; a passing Accept error
// (EMFILE) does not stop it for good; after the takeover the role's server
// answers every request.
func TestEarlyListener(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := &flakyListener{Listener: ln}
	flaky.failures.Store(5)
	l := answerEarly(flaky)
	base := "http://" + ln.Addr().String()
	client := &http.Client{Timeout: 10 * time.Second}
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get(base + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while starting = %d %s, want 200", code, body)
	}
	if code, _ := get("/v1/documents/x"); code != http.StatusServiceUnavailable {
		t.Errorf("a route while starting = %d, want 503", code)
	}

	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) })}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	// Once the role's server runs, it answers every request: a request
	// can meet the starting server only before the takeover.
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, _ := get("/healthz")
		if code == http.StatusTeapot {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz = %d 30 s after the takeover, want the role's answer", code)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for range 50 {
		if code, _ := get("/healthz"); code != http.StatusTeapot {
			t.Fatalf("/healthz = %d after the role's server answered, want its answer", code)
		}
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
}
