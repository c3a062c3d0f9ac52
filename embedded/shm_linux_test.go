//go:build linux && (amd64 || arm64)

package embedded

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPostgresRestartWaitsForSharedMemory: right after a kill -9, the
// killed server's shared memory may still be attached (its processes
// exiting on a busy machine); here the test holds it for half a second.
// Restart waits for it instead of failing with "pre-existing shared
// memory block is still in use".
func TestPostgresRestartWaitsForSharedMemory(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	off := false
	p, err := StartPostgres(ctx, PostgresConfig{Dir: postgresDir(t), Fsync: &off})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop(context.Background()) })
	// postmaster.pid's seventh line holds the shared memory key and id.
	b, err := os.ReadFile(filepath.Join(p.dir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) < 7 {
		t.Fatalf("postmaster.pid has %d lines", len(lines))
	}
	fields := strings.Fields(lines[6])
	if len(fields) != 2 {
		t.Fatalf("postmaster.pid line 7 = %q, want the shared memory key and id", lines[6])
	}
	id, err := strconv.Atoi(fields[1])
	if err != nil {
		t.Fatal(err)
	}
	const shmRdonly = 0o10000 // SHM_RDONLY
	addr, _, errno := syscall.Syscall(syscall.SYS_SHMAT, uintptr(id), 0, shmRdonly)
	if errno != 0 {
		t.Fatalf("attach the server's shared memory: %v", errno)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(500 * time.Millisecond)
		_, _, _ = syscall.Syscall(syscall.SYS_SHMDT, addr, 0, 0)
	}()
	if err := p.Restart(ctx); err != nil {
		t.Fatalf("Restart while the killed server's shared memory is attached: %v", err)
	}
}
