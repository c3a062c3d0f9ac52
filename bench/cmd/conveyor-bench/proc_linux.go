package main

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes the child receive SIGTERM if this process
// dies, so no server outlives a crashed benchmark.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}

// syncDisks writes every dirty page out (sync(2)).
func syncDisks() { syscall.Sync() }
