//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package blob

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDamageLockHoldsAFileLock: the damage lock is a flock on a file in
// the store, which another process sharing the directory (another open
// of the file) cannot take while it is held, and can once it is released.
func TestDamageLockHoldsAFileLock(t *testing.T) {
	t.Parallel()
	d, root := newTestDir(t)
	unlock, err := d.lockDamaged()
	if err != nil {
		t.Fatal(err)
	}
	other, err := os.OpenFile(filepath.Join(root, tempDirName, damageLockName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := unix.Flock(int(other.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("flock while the damage lock is held = %v, want EWOULDBLOCK", err)
	}
	unlock()
	if err := unix.Flock(int(other.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("flock after the damage lock is released = %v, want it taken", err)
	}
}
