package embedded

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakePostgres starts a shell that names itself postgres, as cred if not
// nil, and then runs script. It is reaped at cleanup, not before: until
// then, once it exits, it is a zombie.
func fakePostgres(t *testing.T, cred *syscall.Credential, script string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", "printf postgres > /proc/$$/comm; "+script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for processName(cmd.Process.Pid) != "postgres" {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not name itself postgres", cmd.Process.Pid)
		}
		time.Sleep(time.Millisecond)
	}
	return cmd
}

// zombiePostgres returns the pid of a zombie named postgres, running as
// cred if not nil: a postmaster killed together with its parent, which the
// container's init does not reap.
func zombiePostgres(t *testing.T, cred *syscall.Credential) int {
	t.Helper()
	pid := fakePostgres(t, cred, "exit 0").Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for {
		if state, _, ok := procStat(pid); ok && state == 'Z' {
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not become a zombie", pid)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRemoveStalePIDOfZombie(t *testing.T) {
	t.Parallel()
	pid := zombiePostgres(t, nil)
	dir := t.TempDir()
	path := filepath.Join(dir, "postmaster.pid")
	if err := os.WriteFile(path, []byte(strconv.Itoa(pid)+"\n"+dir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := removeStalePID(path); err != nil {
		t.Fatalf("removeStalePID: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("postmaster.pid naming the zombie postgres %d: %v, want it removed", pid, err)
	}
}

// TestPostgresStartsOverLeftoverLockFiles: after a kill -9 of `conveyor
// up` and its servers, postmaster.pid and the socket's lock file name a
// postmaster that is a zombie (its parent died too, and some container
// inits never reap), or one still shutting down. PostgreSQL itself counts
// both as running and refuses to start ("lock file already exists"); the
// start removes the files of the first and waits for the second.
func TestPostgresStartsOverLeftoverLockFiles(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := postgresDir(t)
	p, err := StartPostgres(ctx, PostgresConfig{Dir: dir, Fsync: off()})
	if err != nil {
		t.Fatalf("StartPostgres: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	// The leftover must run as the user PostgreSQL runs as: PostgreSQL
	// ignores a pid that it may not signal.
	cred := p.runAs
	tests := []struct {
		name     string
		leftover func(t *testing.T) int
	}{
		{name: "zombie postmaster", leftover: func(t *testing.T) int { return zombiePostgres(t, cred) }},
		{name: "postmaster still exiting", leftover: func(t *testing.T) int {
			cmd := fakePostgres(t, cred, "sleep 1; exit 0")
			// Reaped as soon as it exits, as `conveyor up`'s parent would.
			reaped := make(chan struct{})
			go func() { _ = cmd.Wait(); close(reaped) }()
			t.Cleanup(func() { <-reaped })
			return cmd.Process.Pid
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := p.Stop(ctx); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			pid := tt.leftover(t)
			// A killed postmaster leaves both its lock files.
			files := []string{filepath.Join(dir, "postmaster.pid")}
			if p.sockDir != "" {
				files = append(files, filepath.Join(p.sockDir, fmt.Sprintf(".s.PGSQL.%d.lock", p.port)))
			}
			for _, f := range files {
				if err := os.WriteFile(f, []byte(fmt.Sprintf("%d\n%s\n", pid, dir)), 0o600); err != nil {
					t.Fatal(err)
				}
				if cred != nil {
					if err := os.Chown(f, int(cred.Uid), int(cred.Gid)); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := p.Restart(ctx); err != nil {
				t.Fatalf("Restart over the lock files of pid %d: %v", pid, err)
			}
		})
	}
}

// TestChoosePortSaysWhoListens: when the port of the last run is taken,
// the start moves to another one and says who holds it.
func TestChoosePortSaysWhoListens(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	taken := l.Addr().(*net.TCPAddr).Port
	dir := t.TempDir()
	if err := recordPort(dir, taken); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	port, pinned, err := choosePort(dir, 0, slog.New(slog.NewTextHandler(&logs, nil)), "redis")
	if err != nil || pinned || port == taken {
		t.Fatalf("choosePort = %d, %v, %v; want another port than %d, not pinned", port, pinned, err, taken)
	}
	want := fmt.Sprintf("port=%d held_by=\"%s (pid %d)\"", taken, processName(os.Getpid()), os.Getpid())
	if !strings.Contains(logs.String(), want) {
		t.Errorf("log %q lacks %q", logs.String(), want)
	}
}
