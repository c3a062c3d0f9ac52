//go:build !linux

package main

import "os/exec"

// setParentDeathSignal does nothing outside Linux; children still stop at
// the end of the run and after maxChildLife.
func setParentDeathSignal(cmd *exec.Cmd) {}

// syncDisks does nothing outside Linux.
func syncDisks() {}
