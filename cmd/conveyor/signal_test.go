package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

// SIGHUP (a closed terminal) stops a command gracefully, unless it was
// started with SIGHUP ignored (nohup), which it then keeps ignoring.
func TestHangup(t *testing.T) {
	t.Parallel()
	bin := harness.Binary(t)
	for _, ignored := range []bool{false, true} {
		t.Run("ignored="+strconv.FormatBool(ignored), func(t *testing.T) {
			t.Parallel()
			script := `exec "$0" scheduler`
			if ignored {
				script = `trap '' HUP; ` + script
			}
			addr := "127.0.0.1:" + strconv.Itoa(harness.FreePort(t))
			cmd := exec.Command("sh", "-c", script, bin)
			cmd.Env = append(os.Environ(), "REDIS_URL="+testenv.RedisURL(t), "HTTP_ADDR="+addr, "LOG_LEVEL=warn")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() { _ = cmd.Process.Kill() })
			// Serving: its signal handlers are in place.
			deadline := time.Now().Add(time.Minute)
			for {
				resp, err := http.Get("http://" + addr + "/healthz")
				if err == nil {
					resp.Body.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("not serving after a minute: %v", err)
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				if ignored {
					t.Fatalf("exited on a SIGHUP it was started to ignore: %v", err)
				}
				if err != nil {
					t.Fatalf("SIGHUP: exit %v, want a graceful stop (0)", err)
				}
				return
			case <-time.After(3 * time.Second):
				if !ignored {
					t.Fatal("still running 3 s after SIGHUP")
				}
			}
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("SIGTERM: exit %v, want 0", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("still running 30 s after SIGTERM")
			}
		})
	}
}

// TestStartingProcessAnswersLiveness: a process that waits for its Redis
// (down, here) answers /healthz at once, so a liveness probe does not kill
// it in a loop, and 503 "starting" elsewhere; a SIGTERM then stops it with
// exit status 0.
func TestStartingProcessAnswersLiveness(t *testing.T) {
	t.Parallel()
	dead := "redis://127.0.0.1:1" // nothing listens on port 1
	p := harness.Start(t, "handler", []string{"REDIS_URL=" + dead}, "handler")
	client := &http.Client{Timeout: 10 * time.Second} // a process that never answers fails the test
	get := func(path string) (int, string) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			resp, err := client.Get(p.URL() + path)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(b)
			}
			if time.Now().After(deadline) || p.Exited() {
				t.Fatalf("GET %s: %v (exited: %v)", path, err, p.Exited())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if code, body := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while waiting for Redis = %d %s, want 200", code, body)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "starting") {
		t.Errorf("/readyz while waiting for Redis = %d %s, want 503 starting", code, body)
	}
	for deadline := time.Now().Add(time.Minute); !strings.Contains(p.Log(), "waiting for redis"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) || p.Exited() {
			t.Fatalf("the handler is not waiting for Redis:\n%s", p.Log())
		}
	}
	if err := p.Stop(30 * time.Second); err != nil {
		t.Errorf("SIGTERM while starting: %v, want exit status 0", err)
	}
}

// TestSecondSignalExitsAtOnce: a second SIGTERM during a graceful stop that
// waits for a slow upload ends the process at once (status 130) instead of
// after SHUTDOWN_TIMEOUT.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	t.Parallel()
	// An upload whose body never ends: the graceful stop waits for it.
	p, _ := apiWithEndlessUpload(t, "10m")
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if p.Wait(time.Second) {
		t.Fatalf("stopped before its upload ended: %v\n%s", p.ExitErr(), p.Log())
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !p.Wait(30 * time.Second) {
		t.Fatal("still running 30 s after a second SIGTERM")
	}
	var exit *exec.ExitError
	if err := p.ExitErr(); !errors.As(err, &exit) || exit.ExitCode() != 130 {
		t.Errorf("exit = %v, want status 130", err)
	}
	if !strings.Contains(p.Log(), "again: exiting now") {
		t.Errorf("no word of the second signal in the log:\n%s", p.Log())
	}
}

// TestShutdownDelay: with SHUTDOWN_DELAY, a SIGTERM first makes the api's
// readiness fail while it still serves, then the api stops (status 0).
func TestShutdownDelay(t *testing.T) {
	t.Parallel()
	p := harness.Start(t, "api", []string{
		"REDIS_URL=" + testenv.RedisURL(t), "DATABASE_URL=" + testenv.DatabaseURL(t),
		"BLOB_DIR=" + t.TempDir(), "SHUTDOWN_DELAY=15s",
	}, "api")
	p.WaitReady(t, time.Minute)
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Well within the delay, however slow the machine.
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(p.URL() + "/readyz")
		if err != nil {
			t.Fatalf("/readyz right after SIGTERM: %v, want it served (failing) for SHUTDOWN_DELAY", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(b), `"accepting":"down"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz after SIGTERM = %d %s, want 503 with accepting down", resp.StatusCode, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !p.Wait(time.Minute) {
		t.Fatal("still running a minute after SIGTERM")
	}
	if err := p.ExitErr(); err != nil {
		t.Errorf("exit = %v, want 0", err)
	}
}

// TestDrainTimeoutCutsRequestsAndExitsZero: a SIGTERM during an upload
// whose body never ends waits SHUTDOWN_TIMEOUT for it, then cuts it (its
// connection is closed), says so in an error line, and exits 0, as a
// stopped server does: the stop went as configured.
func TestDrainTimeoutCutsRequestsAndExitsZero(t *testing.T) {
	t.Parallel()
	p, conn := apiWithEndlessUpload(t, "1s")
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !p.Wait(30 * time.Second) {
		t.Fatal("still running 30 s after SIGTERM with SHUTDOWN_TIMEOUT=1s")
	}
	if err := p.ExitErr(); err != nil {
		t.Errorf("exit = %v, want status 0", err)
	}
	log := p.Log()
	if !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "did not drain within SHUTDOWN_TIMEOUT") {
		t.Errorf("no error line about the requests cut at the drain timeout:\n%s", log)
	}
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the cut upload's connection: read %d bytes, %v; want it closed", n, err)
	}
}

// apiWithEndlessUpload starts an api with SHUTDOWN_TIMEOUT=shutdownTimeout
// and sends it an upload whose body never ends, over conn (closed at the
// test's end), returning once the api reads it.
func apiWithEndlessUpload(t *testing.T, shutdownTimeout string) (*harness.Proc, net.Conn) {
	t.Helper()
	p := harness.Start(t, "api", []string{
		"REDIS_URL=" + testenv.RedisURL(t), "DATABASE_URL=" + testenv.DatabaseURL(t),
		"BLOB_DIR=" + t.TempDir(), "SHUTDOWN_TIMEOUT=" + shutdownTimeout,
	}, "api")
	p.WaitReady(t, time.Minute)
	conn, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := io.WriteString(conn, "POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"); err != nil {
		t.Fatal(err)
	}
	waitUploadsInFlight(t, p, 1)
	return p, conn
}

// waitUploadsInFlight waits until p's /metrics shows n uploads in progress.
// A test that signals p during an upload waits for it first: that the
// request was written says nothing of whether p's handler reads it yet.
func waitUploadsInFlight(t *testing.T, p *harness.Proc, n float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := p.Metric(t, "conveyor_http_uploads_in_flight")
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("uploads in flight = %v after 30 s, want %v\n%s", got, n, p.Log())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
