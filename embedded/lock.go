package embedded

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrInUse is returned, wrapped, when a server's data folder is locked by
// another server: another `conveyor up` on the same folder, or a server
// that a crashed one left running. Two servers on one folder would write
// the same files (two redis-servers appending to one AOF lose acknowledged
// writes), so the second start is refused. The wrapping error names the
// process that holds the folder, so it can be shown to a user as it is.
var ErrInUse = errors.New("data folder locked")

// lockWait bounds how long a start waits for a data folder held by the
// processes of a server that is going away: one whose owner has exited
// (it received its stop signal when its owner died, see sysProcAttr), or
// one that this process killed. A Redis may be flushing its AOF;
// PostgreSQL backends, which leave the postmaster's process group, exit
// only once they notice that it is gone. A folder owned by another live
// process is refused at once.
const lockWait = 10 * time.Second

// dirLock is an exclusive flock(2) on a lock file that stands for a data
// folder. flock, unlike a pid file, cannot go stale: the kernel drops it
// when the last descriptor of the open file is closed, whatever killed the
// processes holding it. The server is given a copy of the descriptor (see
// startProcess), so the folder stays locked for as long as any process of
// the server is alive, even one orphaned by a crash of its owner.
//
// The file holds the pid of the owner (the process that called Start) and
// of the server, for the error that a second start reports.
type dirLock struct {
	path string
	what string // "redis data folder /x", for errors
	f    *os.File
}

// lockDir takes the lock on path, which stands for what (such as "redis
// data folder /x"). It fails at once, wrapping ErrInUse, if another live
// process owns it, and otherwise waits up to lockWait for it.
func lockDir(ctx context.Context, path, what string) (*dirLock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", what, err)
	}
	l := &dirLock{path: path, what: what, f: f}
	deadline := time.Now().Add(lockWait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errors.Join(fmt.Errorf("lock %s (%s): %w", what, path, err), f.Close())
		}
		owner, server := l.holders()
		if refuseNow(owner, server) || time.Now().After(deadline) || ctx.Err() != nil {
			return nil, errors.Join(l.inUse(owner, server), f.Close())
		}
		select {
		case <-ctx.Done():
		case <-time.After(pollInterval):
		}
	}
	if err := l.record(0); err != nil {
		return nil, errors.Join(err, l.release())
	}
	return l, nil
}

// refuseNow reports whether a lock held by owner for server will not be
// let go soon: another live process owns it, or this process does and the
// server runs. Otherwise what holds it is going away (see lockWait).
func refuseNow(owner, server int) bool {
	if owner == os.Getpid() {
		return server > 0 && pidAlive(server)
	}
	return owner > 0 && pidAlive(owner)
}

// record writes our pid and that of the server (0 if none runs yet).
func (l *dirLock) record(server int) error {
	// The server shares the file offset, so write at an explicit offset.
	b := []byte(strconv.Itoa(os.Getpid()) + "\n" + strconv.Itoa(server) + "\n")
	if err := l.f.Truncate(0); err != nil {
		return fmt.Errorf("record pid in %s: %w", l.path, err)
	}
	if _, err := l.f.WriteAt(b, 0); err != nil {
		return fmt.Errorf("record pid in %s: %w", l.path, err)
	}
	return nil
}

// holders reads the pids of the owner and the server from the lock file,
// 0 where it holds none.
func (l *dirLock) holders() (owner, server int) {
	b := make([]byte, 64)
	n, err := l.f.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, 0
	}
	fields := strings.Fields(string(b[:n]))
	if len(fields) > 0 {
		owner, _ = strconv.Atoi(fields[0])
	}
	if len(fields) > 1 {
		server, _ = strconv.Atoi(fields[1])
	}
	return owner, server
}

// inUse describes who holds the lock, as well as the lock file tells.
func (l *dirLock) inUse(owner, server int) error {
	switch {
	case owner == os.Getpid():
		return fmt.Errorf("%w: %s is in use by another server started by this process (pid %d)", ErrInUse, l.what, owner)
	case owner > 0 && pidAlive(owner):
		return fmt.Errorf("%w: %s is in use by another conveyor up (pid %d): stop it first, or give this one another data folder", ErrInUse, l.what, owner)
	case server > 0 && pidAlive(server):
		name := processName(server)
		if name == "" {
			name = "a server"
		}
		return fmt.Errorf("%w: %s is still in use by %s (pid %d), left running by a conveyor up (pid %d) that has exited: stop it (kill %d) and try again",
			ErrInUse, l.what, name, server, owner, server)
	default:
		return fmt.Errorf("%w: %s is in use: another process holds the lock on %s (processes of a server left by a conveyor up that has exited?)", ErrInUse, l.what, l.path)
	}
}

// release closes our descriptor. The lock goes once no process of the
// server holds its copy either. The file stays: removing it would let a
// process that opened it before the removal lock a file nobody else sees.
// Releasing twice does nothing.
func (l *dirLock) release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("unlock %s: %w", l.what, err)
	}
	return nil
}
