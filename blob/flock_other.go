//go:build !(linux || darwin || dragonfly || freebsd || netbsd || openbsd)

package blob

import "os"

// flockFile does nothing where flock(2) does not exist: the damage lock
// then excludes the goroutines of one process only.
func flockFile(f *os.File) error { return nil }
