// Package harness runs the real conveyor binary as separate processes for
// end-to-end and chaos tests: it builds the binary once, starts roles with
// their own environment and log file, waits for readiness, and stops or
// kills them.
//
// It is test support; production code must not import it.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
	buildDir  string
)

// Binary builds ./cmd/conveyor once per test binary and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		if buildDir, buildErr = os.MkdirTemp("", "conveyor-bin-"); buildErr != nil {
			return
		}
		binPath = filepath.Join(buildDir, "conveyor")
		args := []string{"build", "-o", binPath}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, "./cmd/conveyor")...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/conveyor: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// Cleanup removes the built binary; call it from TestMain after m.Run.
func Cleanup() {
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the conveyor module")
	}
	return filepath.Dir(mod), nil
}

// FreePort returns a free TCP port on 127.0.0.1 for a process to bind
// later. It is picked below the kernel's ephemeral range: a port the
// kernel hands out for port 0 can be taken, once released, by any
// outgoing connection (a Redis client) before the process binds it.
func FreePort(t testing.TB) int {
	t.Helper()
	for range 100 {
		port := 10000 + rand.IntN(ephemeralLow()-10000)
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue // in use
		}
		_ = ln.Close()
		return port
	}
	t.Fatal("no free port below the ephemeral range")
	return 0
}

// ephemeralLow is the first port of the kernel's ephemeral range (Linux's
// default 32768 where it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				return n
			}
		}
	}
	return 32768
}

// Proc is one running conveyor process.
type Proc struct {
	Name    string
	Args    []string
	Env     []string
	Addr    string // HTTP_ADDR, 127.0.0.1:port
	LogPath string
	// picked is set when Start chose Addr: WaitReady may choose another.
	picked bool

	t       testing.TB
	bin     string
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	exitErr error
}

// Start runs `conveyor <args...>` with env (KEY=VALUE; HTTP_ADDR is set to
// a free port unless given) and returns once the process started. It is
// killed at cleanup if still running; its log is printed if the test
// failed.
func Start(t testing.TB, name string, env []string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, Args: args, t: t, bin: Binary(t)}
	hasAddr := false
	for _, kv := range env {
		if strings.HasPrefix(kv, "HTTP_ADDR=") {
			hasAddr = true
			p.Addr = strings.TrimPrefix(kv, "HTTP_ADDR=")
		}
	}
	if !hasAddr {
		p.Addr = "127.0.0.1:" + strconv.Itoa(FreePort(t))
		p.picked = true
		env = append(env, "HTTP_ADDR="+p.Addr)
	}
	p.Env = env
	p.LogPath = filepath.Join(t.TempDir(), name+".log")
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(p.LogPath)
			if len(b) > 64<<10 {
				b = b[len(b)-64<<10:]
			}
			t.Logf("---- log of %s (%s) ----\n%s", name, strings.Join(args, " "), b)
		}
	})
	return p
}

func (p *Proc) start() error {
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.bin, p.Args...)
	cmd.Env = append(baseEnv(), p.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.done, p.exitErr = cmd, done, nil
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logf.Close()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// baseEnv passes PATH and HOME through, nothing else from the test's
// environment: each role gets exactly the configuration the test gives it.
func baseEnv() []string {
	var env []string
	for _, k := range []string{"PATH", "HOME", "TMPDIR", "GORACE"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	return append(env, "LOG_FORMAT=text", "LOG_LEVEL=info")
}

// PID returns the process id of the current run.
func (p *Proc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// URL returns the base URL of the process's HTTP server.
func (p *Proc) URL() string { return "http://" + p.Addr }

// WaitReady waits until GET /readyz answers 200, or fails the test. A
// process whose port Start chose and that could not bind it (another
// process of a test running in parallel took it between FreePort's check
// and the bind) is started again on another port.
func (p *Proc) WaitReady(t testing.TB, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if p.Exited() && p.picked && strings.Contains(p.Log(), "address already in use") {
			old := p.Addr
			p.Addr = "127.0.0.1:" + strconv.Itoa(FreePort(t))
			for i, kv := range p.Env {
				if kv == "HTTP_ADDR="+old {
					p.Env[i] = "HTTP_ADDR=" + p.Addr
				}
			}
			t.Logf("%s could not bind %s; starting it again on %s", p.Name, old, p.Addr)
			if err := os.Truncate(p.LogPath, 0); err != nil {
				t.Fatal(err)
			}
			p.Restart(t)
			continue
		}
		if p.Exited() {
			t.Fatalf("%s exited before it was ready: %v", p.Name, p.ExitErr())
		}
		resp, err := http.Get(p.URL() + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s not ready within %s", p.Name, within)
}

// Exited reports whether the process ended.
func (p *Proc) Exited() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// ExitErr returns the exit error of an ended process (nil for exit 0).
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitErr
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Signal(sig)
}

// Wait waits for the process to end, up to within; it reports whether it
// ended.
func (p *Proc) Wait(within time.Duration) bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	select {
	case <-done:
		return true
	case <-time.After(within):
		return false
	}
}

// Stop sends SIGTERM and waits up to within; it returns the exit error, or
// an error if the process did not end in time (it is then killed).
func (p *Proc) Stop(within time.Duration) error {
	if p.Exited() {
		return p.ExitErr()
	}
	_ = p.Signal(syscall.SIGTERM)
	if !p.Wait(within) {
		p.Kill()
		return fmt.Errorf("%s did not stop within %s after SIGTERM", p.Name, within)
	}
	return p.ExitErr()
}

// Kill sends SIGKILL (kill -9) to the process group and waits for the end.
func (p *Proc) Kill() {
	if p.Exited() {
		return
	}
	p.mu.Lock()
	pid := p.cmd.Process.Pid
	p.mu.Unlock()
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	p.Wait(30 * time.Second)
}

// Restart starts the same command again after it ended.
func (p *Proc) Restart(t testing.TB) {
	t.Helper()
	if !p.Exited() {
		t.Fatalf("restart %s: still running", p.Name)
	}
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
}

// Log returns the process's output so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// Metric returns the sum of the samples of a Prometheus metric whose line
// starts with prefix (e.g. `conveyor_messages_finished_total{consumer_group="x",outcome="acked"}`)
// from the process's /metrics.
func (p *Proc) Metric(t testing.TB, prefix string) float64 {
	t.Helper()
	resp, err := http.Get(p.URL() + "/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", p.Name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range bytes.Split(body, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte(prefix)) {
			continue
		}
		f := strings.Fields(string(line))
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// Run runs `conveyor <args...>` to completion and returns its output.
func Run(t testing.TB, ctx context.Context, env []string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(ctx, Binary(t), args...)
	cmd.Env = append(baseEnv(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
