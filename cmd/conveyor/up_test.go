package main_test

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/conveyor/conveyor/internal/harness"
)

// descendants returns the pids of every process below pid, from /proc.
func descendants(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// comm may hold spaces; the fields after the last ')' are fixed.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], p)
	}
	var out []int
	var walk func(int)
	walk = func(p int) {
		for _, c := range children[p] {
			out = append(out, c)
			walk(c)
		}
	}
	walk(pid)
	return out
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// `conveyor up` with neither REDIS_URL nor DATABASE_URL: it starts its own
// redis-server and PostgreSQL, serves the pipeline, and on SIGINT (or
// SIGHUP) stops every process it started. A second run reuses the data.
func TestUpStartsAndStopsEverything(t *testing.T) {
	t.Parallel()
	// The folder must be enterable by the unprivileged user PostgreSQL runs
	// as when the tests run as root.
	data, err := os.MkdirTemp("", "conveyor-up-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(data) })
	if err := os.Chmod(data, 0o755); err != nil {
		t.Fatal(err)
	}
	// Uploads go where BLOB_DIR_FILE says: any variable may come from a
	// file, and up's own default must not override it.
	blobs := filepath.Join(data, "my-blobs")
	blobFile := filepath.Join(data, "blob-dir")
	if err := os.WriteFile(blobFile, []byte(blobs+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"CONVEYOR_DATA_DIR=" + data, "BLOB_DIR_FILE=" + blobFile}

	var docID string
	for run := 1; run <= 2; run++ {
		up := harness.Start(t, "up-"+strconv.Itoa(run), env, "up")
		up.WaitReady(t, 2*time.Minute)
		kids := descendants(up.PID())
		if len(kids) < 2 {
			t.Fatalf("run %d: conveyor up has %d child processes, want redis-server and postgres", run, len(kids))
		}
		if run == 1 {
			p := &pipeline{t: t, api: up}
			docID = p.upload("hello.txt", []byte("Hello from conveyor up. Second sentence."), "")
			final := p.waitFinal([]string{docID})
			if final[docID].Status != "processed" {
				t.Fatalf("document: %+v", final[docID])
			}
			if !strings.Contains(up.Log(), "Conveyor is up: http://") {
				t.Fatalf("no API URL printed:\n%s", up.Log())
			}
			// The line to paste for status, dlq and schedules names the
			// servers up started, and not BLOB_DIR, which the user set.
			export := regexp.MustCompile(`(?m)^  export .*$`).FindString(up.Log())
			if !strings.Contains(export, " REDIS_URL=redis://127.0.0.1:") || !strings.Contains(export, " DATABASE_URL='postgres://") || strings.Contains(export, "BLOB_DIR") {
				t.Errorf("export line %q: want REDIS_URL and DATABASE_URL of the local servers, and no BLOB_DIR", export)
			}
			stored := 0
			_ = filepath.WalkDir(blobs, func(_ string, d fs.DirEntry, err error) error {
				if err == nil && d.Type().IsRegular() {
					stored++
				}
				return nil
			})
			if stored == 0 {
				t.Errorf("no upload stored under BLOB_DIR_FILE's folder %s", blobs)
			}
		} else {
			// The data of the first run is still there.
			resp, err := http.Get(up.URL() + "/v1/documents/" + docID)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("second run lost the document of the first: %d", resp.StatusCode)
			}
			// Another up on the same data while this one runs is
			// refused: two redis-servers on one append-only file lose
			// acknowledged writes.
			other := harness.Start(t, "up-same-data", env, "up")
			if !other.Wait(time.Minute) {
				t.Fatal("a second conveyor up on the same data folder is still running")
			}
			if other.ExitErr() == nil || !strings.Contains(other.Log(), "in use by another conveyor up") {
				t.Fatalf("a second conveyor up on the same data folder: exit %v, want it refused:\n%s", other.ExitErr(), other.Log())
			}
		}
		// Ctrl-C ends the first run; the second ends as when its terminal
		// is closed.
		sig := syscall.SIGINT
		if run == 2 {
			sig = syscall.SIGHUP
		}
		if err := up.Signal(sig); err != nil {
			t.Fatal(err)
		}
		if !up.Wait(time.Minute) {
			t.Fatalf("conveyor up did not stop after %v", sig)
		}
		if err := up.ExitErr(); err != nil {
			t.Fatalf("conveyor up exited with %v:\n%s", err, up.Log())
		}
		for _, pid := range kids {
			if alive(pid) {
				t.Errorf("run %d: child process %d still alive after conveyor up stopped", run, pid)
			}
		}
	}
}

// Without redis-server on PATH, `conveyor up` says how to install it and
// prints no stack trace.
func TestUpExplainsMissingServers(t *testing.T) {
	t.Parallel()
	bin := harness.Binary(t)
	empty := t.TempDir()
	out, err := runWithPath(t, bin, empty, "CONVEYOR_DATA_DIR="+t.TempDir())
	if err == nil {
		t.Fatalf("conveyor up succeeded without redis-server:\n%s", out)
	}
	for _, want := range []string{"apt-get install", "brew install", "docker compose"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "goroutine ") || strings.Contains(out, "panic") {
		t.Errorf("output has a stack trace:\n%s", out)
	}
}

func runWithPath(t *testing.T, bin, path string, env ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "up")
	cmd.Env = append([]string{"PATH=" + path, "HOME=" + os.Getenv("HOME"), "HTTP_ADDR=127.0.0.1:0"}, env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
