package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/idem"
)

// HTTP servers under test: the real API (the `conveyor api` binary as its
// own process, or api.New(...).Handler() in this process) and the minimal
// baseline servers, which run the same way as the API (a child process
// running this program, or in this process) so that both sides of a ratio
// are placed alike.

// minimalCommand is the first argument that makes this program a minimal
// baseline server instead of the benchmark.
const minimalCommand = "serve-minimal"

// maxChildLife bounds every server this program starts.
const maxChildLife = 45 * time.Minute

// server is a running HTTP server under test.
type server struct {
	url  string
	pid  int // the server's own process, 0 when in this process
	stop func() error
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// conveyorBinary builds ./cmd/conveyor from the repository once.
func (b *bench) conveyorBinary(ctx context.Context) (string, error) {
	buildOnce.Do(func() {
		builtBin = filepath.Join(b.env.tmp, "conveyor")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", builtBin, "./cmd/conveyor")
		cmd.Dir = b.opts.repo
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/conveyor: %v\n%s", err, out)
		}
	})
	return builtBin, buildErr
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	return addr, l.Close()
}

// startAPI starts the API with extra environment (binary mode only).
func (b *bench) startAPI(ctx context.Context, extraEnv ...string) (*server, error) {
	blobDir := filepath.Join(b.env.tmp, "blobs")
	if b.opts.apiMode == "inproc" {
		return b.startAPIInProcess(ctx, blobDir)
	}
	bin, err := b.conveyorBinary(ctx)
	if err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "api")
	cmd.Env = append(os.Environ(),
		"REDIS_URL="+b.env.redisURL, "CACHE_REDIS_URL="+b.env.redisURL, "DATABASE_URL="+b.env.dbURL,
		"HTTP_ADDR="+addr, "BLOB_DIR="+blobDir, "OUTBOX_DIR="+filepath.Join(b.env.tmp, "outbox"),
		"LOG_LEVEL=warn", "LOG_FORMAT=text", "SHUTDOWN_TIMEOUT=5s")
	cmd.Env = append(cmd.Env, extraEnv...)
	return b.startChild(ctx, cmd, "http://"+addr)
}

// startChild starts cmd, waits for its /healthz (or, for the minimal
// server, for the address it prints) and returns how to stop it.
func (b *bench) startChild(ctx context.Context, cmd *exec.Cmd, url string) (*server, error) {
	cmd.Stderr = b.logFile
	if cmd.Stdout == nil {
		cmd.Stdout = b.logFile
	}
	setParentDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			return nil
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return errors.New("server did not stop within 10s; killed")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url + "/healthz")
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &server{url: url, pid: cmd.Process.Pid, stop: stop}, nil
			}
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("%s exited while starting: %v (see the log)", cmd.Path, err)
		case <-ctx.Done():
			_ = stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, fmt.Errorf("%s did not answer /healthz within 30s", cmd.Path)
		}
	}
}

// startAPIInProcess serves the real API handler from this process.
func (b *bench) startAPIInProcess(ctx context.Context, blobDir string) (*server, error) {
	rdb, err := newRedis(b.env.redisURL, 0)
	if err != nil {
		return nil, err
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, Source: "conveyor", Logger: b.log})
	if err != nil {
		return nil, err
	}
	blobs, err := blob.NewDir(blob.DirConfig{Dir: blobDir})
	if err != nil {
		return nil, err
	}
	c, err := cache.New(cache.Config{Redis: rdb, Logger: b.log})
	if err != nil {
		return nil, err
	}
	marks, err := idem.New(idem.Config{Redis: rdb})
	if err != nil {
		return nil, err
	}
	a, err := api.New(api.Config{Publisher: pub, Blobs: blobs, Reader: b.env.st, Cache: c, Idem: marks,
		MaxUploadBytes: 256 << 20, Logger: b.log})
	if err != nil {
		return nil, err
	}
	s, err := serveInProcess(a.Handler())
	if err != nil {
		return nil, err
	}
	stop := s.stop
	s.stop = func() error {
		err := stop()
		_ = pub.Close()
		_ = rdb.Close()
		return err
	}
	return s, nil
}

// serveInProcess serves h on a free port with the product's server
// timeouts.
func serveInProcess(h http.Handler) (*server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv := newHTTPServer(h)
	go func() { _ = srv.Serve(ln) }()
	return &server{url: "http://" + ln.Addr().String(), stop: func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return srv.Shutdown(ctx)
	}}, nil
}

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       5 * time.Minute,
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
}

// startMinimal starts a minimal baseline server: "xadd" appends each
// POST /v1/events body to key with one XADD; "get" answers
// GET /v1/documents/{id} with the bytes of one Redis GET of key.
func (b *bench) startMinimal(ctx context.Context, mode, key string) (*server, error) {
	if b.opts.apiMode == "inproc" {
		rdb, err := newRedis(b.env.redisURL, 0)
		if err != nil {
			return nil, err
		}
		s, err := serveInProcess(minimalHandler(rdb, mode, key))
		if err != nil {
			return nil, err
		}
		stop := s.stop
		s.stop = func() error { err := stop(); _ = rdb.Close(); return err }
		return s, nil
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, minimalCommand, "-mode", mode, "-redis", b.env.redisURL, "-key", key, "-addr", addr)
	return b.startChild(ctx, cmd, "http://"+addr)
}

func minimalHandler(rdb *redis.Client, mode, key string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	switch mode {
	case "xadd":
		mux.HandleFunc("POST /v1/events", func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
			if err != nil {
				http.Error(w, "bad body", http.StatusBadRequest)
				return
			}
			id, err := rdb.XAdd(r.Context(), &redis.XAddArgs{Stream: key, Values: []any{"payload", body}}).Result()
			if err != nil {
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusAccepted)
			_, _ = io.WriteString(w, `{"event_id":"`+id+"\"}\n")
		})
	case "get":
		mux.HandleFunc("GET /v1/documents/{id}", func(w http.ResponseWriter, r *http.Request) {
			v, err := rdb.Get(r.Context(), key).Bytes()
			if err != nil {
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(v)
		})
	}
	return mux
}

// minimalMain runs a minimal server as a child process. It stops on
// SIGTERM, when its parent dies (Linux), or after maxChildLife.
func minimalMain(args []string) error {
	fs := flag.NewFlagSet(minimalCommand, flag.ContinueOnError)
	mode := fs.String("mode", "xadd", "xadd or get")
	redisURL := fs.String("redis", "", "Redis URL")
	key := fs.String("key", "", "stream (xadd) or key (get)")
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *mode != "xadd" && *mode != "get" {
		return fmt.Errorf("-mode must be xadd or get")
	}
	if !strings.HasPrefix(*addr, "127.0.0.1:") {
		return fmt.Errorf("-addr must be on 127.0.0.1")
	}
	rdb, err := newRedis(*redisURL, 0)
	if err != nil {
		return err
	}
	defer rdb.Close()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := newHTTPServer(minimalHandler(rdb, *mode, *key))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, maxChildLife)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	return srv.Shutdown(sctx)
}

// peakRSS returns the peak resident set size (VmHWM) of a process, in
// bytes.
func peakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmHWM in /proc status")
}
