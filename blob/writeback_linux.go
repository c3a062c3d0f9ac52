package blob

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// startWriteBack asks the kernel to start writing the given range of w to
// the disk now, without waiting. A large blob is then mostly on the disk by
// the time Put calls fsync, which otherwise writes all of it at the end,
// while the client waits. It is a hint: errors are ignored, and the fsync
// still decides durability.
func startWriteBack(w io.Writer, off, n int64) {
	f, ok := w.(*os.File)
	if !ok {
		return
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
	})
}
