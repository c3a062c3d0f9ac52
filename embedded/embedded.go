// Package embedded starts local redis-server and PostgreSQL processes in a
// data folder it owns. `conveyor up` uses it on a laptop when REDIS_URL or
// DATABASE_URL is unset, and integration tests use it for throw-away servers.
//
// The servers are ordinary child processes of the caller, found on PATH (or,
// for PostgreSQL, in the usual install folders). Each one runs in its own
// process group, so that a Ctrl-C in the terminal reaches the parent only and
// the parent can stop the servers in order, after the roles that use them.
// Stop and Kill take the whole group down and reap the server, so that no
// process or zombie is left behind. On Linux a server also receives its stop
// signal if the parent dies, so a crashed parent does not leave servers
// holding ports and data folders.
//
// Each server holds a lock (flock) on its data folder, which the server's
// processes inherit, so that a second start on the same folder is refused
// (ErrInUse) for as long as any of them is alive, and the kernel drops the
// lock once they are all gone, however they ended. A server that dies
// without being stopped is restarted on the same port and data; if it
// cannot be, Failed and Err report it.
//
// The servers are for development and tests only: they listen on 127.0.0.1,
// Redis has no password and PostgreSQL trusts every local connection.
//
// Package embedded must not import other project packages: the command and
// the test helpers depend on it, not the other way round.
package embedded

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// ErrNotInstalled is returned, wrapped, when a server binary cannot be
// found: redis-server on PATH, or PostgreSQL's postgres and initdb on PATH
// or in the usual install folders. The wrapping error names the binary and
// says how to install it (apt-get on Debian/Ubuntu, brew on macOS, or docker
// compose instead), so it can be shown to a user as it is.
var ErrNotInstalled = errors.New("server not installed")

// Install hints, shown with ErrNotInstalled.
const (
	redisInstallHint = "install it with `sudo apt-get install -y redis-server` (Debian/Ubuntu) " +
		"or `brew install redis` (macOS), or use docker compose (see README)"
	postgresInstallHint = "install it with `sudo apt-get install -y postgresql` (Debian/Ubuntu) " +
		"or `brew install postgresql@16` (macOS), or use docker compose (see README)"
)

// portFile is the file, in a server's data folder, that records the port of
// the last run, so that a second `conveyor up` gives the same URLs.
const portFile = "conveyor.port"

// errPortInUse marks a start that failed because another process took the
// port between the moment it was found free and the moment the server bound
// it. A start on a port the caller did not choose retries on a new port.
var errPortInUse = errors.New("port already in use")

// errShmInUse marks a PostgreSQL start that failed because processes of a
// killed server had not yet let go of its shared memory.
var errShmInUse = errors.New("shared memory of the previous server still in use")

// errPIDFileInUse marks a PostgreSQL start that failed because a lock file
// (postmaster.pid, or the socket's) named a live process, such as a
// postmaster of a killed `conveyor up` that is still shutting down.
var errPIDFileInUse = errors.New("lock file of the previous server still in use")

// lockFileExists matches PostgreSQL's refusal to start over a lock file.
var lockFileExists = regexp.MustCompile(`FATAL: +lock file ".*" already exists`)

// portAttempts is how many ports a start tries before giving up, when the
// caller did not fix the port.
const portAttempts = 3

// findBinary resolves name (a bare name looked up on PATH, or a path) to an
// executable, and wraps ErrNotInstalled with hint when there is none.
func findBinary(name, hint string) (string, error) {
	path, err := exec.LookPath(name)
	if err == nil {
		return path, nil
	}
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		where := "on PATH"
		if strings.ContainsRune(name, filepath.Separator) {
			where = "at " + name
		}
		return "", fmt.Errorf("%w: %s was not found %s; %s", ErrNotInstalled, filepath.Base(name), where, hint)
	}
	return "", fmt.Errorf("find %s: %w", name, err)
}

// choosePort returns the port to start on: the configured one if it is not
// zero, else the one recorded in dir by an earlier run if it is still free,
// else a free port. pinned reports whether the port must not be changed if
// it turns out to be taken.
//
// The caller holds the lock on dir, so a recorded port that is taken is
// not taken by a server on dir: moving to another port starts no second
// server on the same data. log says who took it, because the URLs change.
func choosePort(dir string, configured int, log *slog.Logger, server string) (port int, pinned bool, err error) {
	if configured != 0 {
		return configured, true, nil
	}
	if b, err := os.ReadFile(filepath.Join(dir, portFile)); err == nil {
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p > 0 && p < 65536 {
			if portFree(p) {
				return p, false, nil
			}
			held := "another process"
			if who := portListener(p); who != "" {
				held = who
			}
			log.Warn("the port of the last run is taken; starting on another one", "server", server, "port", p, "held_by", held)
		}
	}
	p, err := freePort()
	return p, false, err
}

// recordPort writes port to dir, for choosePort of the next run.
func recordPort(dir string, port int) error {
	if err := os.WriteFile(filepath.Join(dir, portFile), []byte(strconv.Itoa(port)+"\n"), 0o644); err != nil {
		return fmt.Errorf("record port: %w", err)
	}
	return nil
}

// freePort asks the kernel for a free TCP port on 127.0.0.1. The port is
// released before the server binds it, so another process may take it in
// between; starts detect that (errPortInUse) and try again.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}

// portFree reports whether port can be bound on 127.0.0.1.
func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	return l.Close() == nil
}

// mkdirAll creates dir with mode perm, and any missing parent with mode
// 0755. Unlike os.MkdirAll it does not give the parents dir's own (possibly
// private) mode, and it sets the modes explicitly so that a restrictive
// umask cannot make a parent it created impassable for the PostgreSQL user.
// Directories that already exist are left alone.
func mkdirAll(dir string, perm fs.FileMode) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s exists and is not a directory", dir)
		}
		return nil
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirAll(parent, 0o755); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, perm); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return os.Chmod(dir, perm)
}

// tailBytes is how much of a server's output an error about an early exit
// quotes: enough for the reason, not a whole log.
const tailBytes = 2048

// output is where a server's stdout and stderr go. Output to the log file
// is handed to the server as the file itself, so the server writes it
// directly (it keeps working without our process and needs no copying
// goroutine); output to a caller's writers goes through a ring buffer as
// well, so that an early exit can still quote it.
type output struct {
	stdout, stderr io.Writer

	logPath   string // "" if nothing goes to the log file
	logOffset int64  // size of the log file before this run
	logFile   *os.File
	ring      *ring
}

// newOutput opens logPath (appending) for each of stdout and stderr that is
// nil.
func newOutput(logPath string, stdout, stderr io.Writer) (*output, error) {
	o := &output{}
	if stdout == nil || stderr == nil {
		f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open log: %w", err)
		}
		fi, err := f.Stat()
		if err != nil {
			_ = f.Close() // the Stat error is the one worth reporting
			return nil, fmt.Errorf("open log: %w", err)
		}
		o.logPath, o.logOffset, o.logFile = logPath, fi.Size(), f
	}
	if stdout != nil || stderr != nil {
		o.ring = &ring{}
	}
	o.stdout = o.writer(stdout)
	o.stderr = o.writer(stderr)
	return o, nil
}

func (o *output) writer(w io.Writer) io.Writer {
	if w == nil {
		return o.logFile
	}
	return io.MultiWriter(w, o.ring)
}

// closeFile closes our copy of the log file. The server has its own copy,
// so this is done as soon as it has started.
func (o *output) closeFile() {
	if o.logFile != nil {
		_ = o.logFile.Close() // opened for writing by the child; nothing buffered here
		o.logFile = nil
	}
}

// tail returns the end of what the server wrote during this run.
func (o *output) tail() string {
	var parts []string
	if o.logPath != "" {
		if s := fileTail(o.logPath, o.logOffset); s != "" {
			parts = append(parts, s)
		}
	}
	if o.ring != nil {
		if s := strings.TrimSpace(o.ring.String()); s != "" {
			parts = append(parts, s)
		}
	}
	if len(parts) == 0 {
		return "(no output)"
	}
	return strings.Join(parts, "\n")
}

// fileTail returns at most tailBytes from the end of path, but nothing
// before offset.
func fileTail(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	start := max(offset, fi.Size()-tailBytes)
	b := make([]byte, fi.Size()-start)
	n, _ := f.ReadAt(b, start) // a short read still gives a useful tail
	return strings.TrimSpace(string(b[:n]))
}

// ring keeps the last tailBytes written to it.
type ring struct {
	mu  sync.Mutex
	buf []byte
}

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	if len(r.buf) > tailBytes {
		r.buf = append(r.buf[:0], r.buf[len(r.buf)-tailBytes:]...)
	}
	return len(p), nil
}

func (r *ring) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return string(r.buf)
}

// exitError describes a server that exited while starting, quoting its
// output. It is marked errPortInUse when the output says the port was
// taken, and then says by whom if that can be told.
func exitError(name string, port int, exit error, out *output) error {
	tail := out.tail()
	if strings.Contains(tail, "Address already in use") {
		held := ""
		if who := portListener(port); who != "" {
			held = ", held by " + who
		}
		return fmt.Errorf("%s exited while starting on port %d (%w%s): %v\n%s", name, port, errPortInUse, held, exit, tail)
	}
	if strings.Contains(tail, "pre-existing shared memory block") {
		return fmt.Errorf("%s exited while starting on port %d (%w): %v\n%s", name, port, errShmInUse, exit, tail)
	}
	if lockFileExists.MatchString(tail) {
		return fmt.Errorf("%s exited while starting on port %d (%w): %v\n%s", name, port, errPIDFileInUse, exit, tail)
	}
	return fmt.Errorf("%s exited while starting on port %d: %v\n%s", name, port, exit, tail)
}
