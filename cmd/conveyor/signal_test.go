package main

import (
	"net/http"
	"os"
	"os/exec"
	"strconv"
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
