//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package blob

import (
	"os"

	"golang.org/x/sys/unix"
)

// flockFile takes an exclusive flock(2) on f, waiting for it; closing f
// releases it. Linux takes it across NFS too (as a POSIX lock of the
// whole file), so replicas that share a volume exclude each other.
func flockFile(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			return err
		}
	}
}
