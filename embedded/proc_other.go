//go:build !linux

package embedded

import (
	"errors"
	"syscall"
)

// sysProcAttr puts the server in its own process group and runs it as cred
// if that is not nil. Only Linux can tie the server's life to ours.
func sysProcAttr(_ syscall.Signal, cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred}
}

// groupAlive reports whether any process is still in the process group
// pgid. Without /proc, zombies cannot be told apart; the system's init
// reaps them promptly outside containers.
func groupAlive(pgid int) bool {
	err := syscall.Kill(-pgid, 0)
	return !errors.Is(err, syscall.ESRCH)
}

// processName returns "", because the command name of another process is
// not available without /proc; callers then trust the pid alone.
func processName(int) string { return "" }

// pidAlive reports whether a process with this pid exists (EPERM means it
// exists but belongs to someone else). Without /proc, zombies cannot be
// told apart.
func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// portListener returns "": finding the process behind a port needs /proc.
func portListener(int) string { return "" }
