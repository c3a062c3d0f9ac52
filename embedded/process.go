package embedded

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sync/atomic"
	"syscall"
	"time"
)

// groupExitTimeout bounds the wait for the members of a server's process
// group to disappear once they have been sent SIGKILL. A killed process
// dies at once; the bound only turns a kernel-level hang into an error.
const groupExitTimeout = 30 * time.Second

// pollInterval is how often readiness and group exit are checked.
const pollInterval = 20 * time.Millisecond

// process is a started server: the leader of its own process group, reaped
// by a goroutine as soon as it exits so that it never lingers as a zombie.
type process struct {
	name    string
	cmd     *exec.Cmd
	out     *output
	stopSig syscall.Signal
	logger  *slog.Logger

	// quiet is set while an exit needs no warning from the reaper: while
	// starting (the start returns the error) and once the process has been
	// asked to stop.
	quiet atomic.Bool

	done    chan struct{} // closed once the process has been reaped
	waitErr error         // the result of cmd.Wait; read only after done
}

// startProcess starts cmd in its own process group. stopSig is the signal
// that stops the server gracefully; on Linux the server also receives it
// when the parent dies. cred, if not nil, is the user to run as.
//
// The server inherits a descriptor of lock, the lock on its data folder
// (as fd 3, which neither Redis nor PostgreSQL uses or closes), and so do
// the processes it forks. The folder then stays locked while any of them
// lives: if our process dies and its servers outlive it, a second start on
// the folder is refused instead of starting a second server on the same
// files.
func startProcess(name string, cmd *exec.Cmd, out *output, stopSig syscall.Signal, cred *syscall.Credential, lock *dirLock, logger *slog.Logger) (*process, error) {
	cmd.Stdout, cmd.Stderr = out.stdout, out.stderr
	cmd.SysProcAttr = sysProcAttr(stopSig, cred)
	cmd.ExtraFiles = []*os.File{lock.f}
	err := cmd.Start()
	out.closeFile() // the child has its own copy of the log file
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, out: out, stopSig: stopSig, logger: logger, done: make(chan struct{})}
	p.quiet.Store(true)
	go p.reap()
	if err := lock.record(p.pid()); err != nil {
		// The pid only makes a second start's error more precise.
		logger.Warn("cannot record the server's pid in the lock file", "server", name, "error", err)
	}
	return p, nil
}

func (p *process) reap() {
	p.waitErr = p.cmd.Wait()
	// Log before closing done, so that the warning is written before Stop
	// returns (a test's logger must not be used after the test).
	if !p.quiet.Load() {
		p.logger.Warn("server exited unexpectedly", "server", p.name, "pid", p.pid(), "error", exitStatus(p.waitErr))
	}
	close(p.done)
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has exited and been reaped.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitStatus describes the result of cmd.Wait for an error message.
func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// stop sends the stop signal and waits for the server to exit. If ctx ends
// first, it kills the whole group and returns an error wrapping ctx.Err().
// Either way, it returns only when no member of the group is left.
func (p *process) stop(ctx context.Context) error {
	p.quiet.Store(true)
	if !p.exited() {
		// Only the leader gets the graceful signal: it stops its own
		// children in order (PostgreSQL's postmaster waits for its
		// backends; Redis ends a background rewrite).
		// It may exit on its own meanwhile: that is not an error.
		err := p.cmd.Process.Signal(p.stopSig)
		if err != nil && !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("stop %s: %w", p.name, err)
		}
		select {
		case <-p.done:
		case <-ctx.Done():
			if err := p.kill(); err != nil {
				return fmt.Errorf("stop %s: %w", p.name, err)
			}
			return fmt.Errorf("stop %s: killed after %w", p.name, ctx.Err())
		}
	}
	if err := p.sweep(); err != nil {
		return fmt.Errorf("stop %s: %w", p.name, err)
	}
	return nil
}

// kill sends SIGKILL to the whole group, waits until the leader is reaped
// and the other members are gone, and returns.
func (p *process) kill() error {
	p.quiet.Store(true)
	if !p.exited() {
		// The group exists while its leader is unreaped, so the pgid still
		// names our server and nobody else.
		if err := syscall.Kill(-p.pid(), syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill %s: %w", p.name, err)
		}
		<-p.done
	}
	return p.sweep()
}

// sweep kills what is left of the group after the leader exited (children
// that outlived it, such as PostgreSQL backends of a killed postmaster) and
// waits until they are gone. Children reparented to init are reaped by
// init, so zombies are not waited for: they hold no port, file or memory.
func (p *process) sweep() error {
	pgid := p.pid()
	if !groupAlive(pgid) {
		return nil
	}
	// Members are left, so the pgid cannot have been reused yet.
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill rest of process group %d: %w", pgid, err)
	}
	deadline := time.Now().Add(groupExitTimeout)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("process group %d still has members %s after SIGKILL", pgid, groupExitTimeout)
		}
		time.Sleep(pollInterval)
	}
	return nil
}

// waitReady calls probe until it succeeds, the process exits, or ctx ends.
// In the last two cases the process is killed (a half-started server is of
// no use) and the error says why, quoting the server's output if it exited.
func (p *process) waitReady(ctx context.Context, port int, probe func(ctx context.Context) error) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		err := probe(ctx)
		if err == nil {
			p.quiet.Store(false)
			return nil
		}
		select {
		case <-p.done:
			sweepErr := p.sweep()
			return errors.Join(exitError(p.name, port, errors.New(exitStatus(p.waitErr)), p.out), sweepErr)
		case <-ctx.Done():
			killErr := p.kill()
			return errors.Join(fmt.Errorf("wait for %s on port %d: %w (last error: %v)", p.name, port, ctx.Err(), err), killErr)
		case <-t.C:
		}
	}
}
