package blob

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	// copyBufferSize bounds the memory one Put uses, whatever the upload
	// size, and sets the size of each write.
	copyBufferSize = 1 << 20
	// copyBuffers is how many buffers one Put cycles through at most: one
	// being read, one being hashed, one being written. It takes them from
	// copyBufferPool as it needs them (an upload smaller than one buffer
	// takes one) and puts them back when done.
	copyBuffers = 3
	// tempPrefix marks the files Put creates, so that the start-up sweep
	// only ever removes its own leftovers.
	tempPrefix = "put-"
	// asidePrefix marks stored bytes DeleteIfUnchanged took out of their
	// name to look at. The start-up sweep puts back any it finds (left by
	// a crash): they may be needed, and retention removes them later if
	// not.
	asidePrefix = "delete-"
	// tempDirName is a sibling of the fan-out directories. It cannot clash
	// with them: their names are two hex characters.
	tempDirName = "tmp"
)

// DirConfig configures a Dir.
type DirConfig struct {
	// Dir is the root directory of the store. It is created if missing.
	// Required.
	Dir string
	// TempMaxAge is the age after which a temp file left in Dir/tmp by an
	// interrupted Put is removed: when the store is opened, and by
	// RemoveStaleTemps (blob retention, hourly). A Put in progress
	// keeps its file's modification time fresh, so a live upload is only at
	// risk if it stalls for this long. Defaults to 1h.
	TempMaxAge time.Duration
}

func (c *DirConfig) setDefaults() {
	if c.TempMaxAge == 0 {
		c.TempMaxAge = time.Hour
	}
}

// Validate reports every problem with the config at once.
func (c DirConfig) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, errors.New("dir is required"))
	}
	if c.TempMaxAge < 0 {
		errs = append(errs, fmt.Errorf("temp max age must not be negative, got %s", c.TempMaxAge))
	}
	return errors.Join(errs...)
}

// Dir is a Store in a local directory, content-addressed by SHA-256.
//
// A blob with key k lives at Dir/k[0:2]/k[2:4]/k; the two fan-out levels
// keep directories small. Put writes to a temp file in Dir/tmp, on the same
// file system as the final path, and publishes it with a hard link, so the
// final name only ever holds complete, fsynced bytes. Several processes may
// share one Dir (replicas on one volume): every step is safe against
// concurrent writers of the same key.
type Dir struct {
	root       string
	tmp        string
	tempMaxAge time.Duration
	// damagedMu is this process's half of the damage lock (lockDamaged).
	damagedMu sync.Mutex
}

var _ Store = (*Dir)(nil)

// NewDir validates cfg, creates cfg.Dir and cfg.Dir/tmp (mode 0o755) if
// they are missing, and removes temp files older than cfg.TempMaxAge left
// behind by Puts that were interrupted by a crash.
func NewDir(cfg DirConfig) (*Dir, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("blob dir config: %w", err)
	}
	d := &Dir{root: filepath.Clean(cfg.Dir), tempMaxAge: cfg.TempMaxAge}
	d.tmp = filepath.Join(d.root, tempDirName)
	if err := os.MkdirAll(d.tmp, 0o755); err != nil {
		return nil, fmt.Errorf("create blob dir: %w", err)
	}
	if err := d.putBackAside(); err != nil {
		return nil, fmt.Errorf("put back blobs left aside: %w", err)
	}
	if err := d.RemoveStaleTemps(); err != nil {
		return nil, err
	}
	return d, nil
}

// RemoveStaleTemps removes the temp files older than DirConfig.TempMaxAge:
// those of Puts that a crash interrupted. NewDir calls it; so does blob
// retention, every hour, since a process killed mid-upload and restarted
// at once leaves its temp files younger than that, and nothing else would
// remove them until the next start.
func (d *Dir) RemoveStaleTemps() error {
	if err := d.removeStaleTemps(time.Now().Add(-d.tempMaxAge)); err != nil {
		return fmt.Errorf("remove stale blob temp files: %w", err)
	}
	return nil
}

// putBackAside puts the bytes DeleteIfUnchanged left aside (a crash
// between its rename and its decision) back under their names.
func (d *Dir) putBackAside() error {
	entries, err := os.ReadDir(d.tmp)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), asidePrefix)
		if !ok || !e.Type().IsRegular() || len(rest) < keyLen || !validKey(rest[:keyLen]) {
			continue
		}
		if err := d.putBack(filepath.Join(d.tmp, e.Name()), rest[:keyLen]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// putBack renames the file at aside back to key's name. Should a Put have
// stored the bytes there again meanwhile, the same bytes replace them, with
// the later time of the two files' (the file aside was touched, or is the
// older): whoever created the other copy then finds it changed and keeps it.
func (d *Dir) putBack(aside, key string) error {
	if err := d.makeFanOut(key); err != nil {
		return err
	}
	final := d.path(key)
	if err := os.Rename(aside, final); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // put back by another process
		}
		return fmt.Errorf("put back blob %s: %w", key, err)
	}
	return syncDir(filepath.Dir(final))
}

// removeStaleTemps removes the temp files last modified before cutoff.
func (d *Dir) removeStaleTemps(cutoff time.Time) error {
	entries, err := os.ReadDir(d.tmp)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if !e.Type().IsRegular() || !strings.HasPrefix(e.Name(), tempPrefix) {
			continue
		}
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // another replica swept it first
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !fi.ModTime().Before(cutoff) {
			continue
		}
		if err := os.Remove(filepath.Join(d.tmp, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Put streams r into the directory. See Store.Put.
func (d *Dir) Put(ctx context.Context, r io.Reader, maxBytes int64) (Info, error) {
	if maxBytes <= 0 {
		return Info{}, fmt.Errorf("put blob: max bytes must be positive, got %d", maxBytes)
	}
	if err := ctx.Err(); err != nil {
		return Info{}, fmt.Errorf("put blob: %w", err)
	}

	tmp, err := os.CreateTemp(d.tmp, tempPrefix+"*")
	if err != nil {
		return Info{}, fmt.Errorf("put blob: create temp file: %w", err)
	}
	closed, removeTemp := false, true
	defer func() {
		if !closed {
			_ = tmp.Close() // the write already failed; that error is the one returned
		}
		// The temp name goes on every path but one (replaceDamaged renamed
		// it: the name is free, and may be another Put's by now). After a
		// successful publish the bytes live on under the final name (a hard
		// link to the same inode). If this removal fails, the start-up sweep
		// removes the file later; the Put itself is still correct, so it is
		// not failed.
		if removeTemp {
			_ = os.Remove(tmp.Name())
		}
	}()

	sum, size, err := copyHashed(ctx, tmp, r, maxBytes)
	if err != nil {
		return Info{}, fmt.Errorf("put blob: %w", err)
	}
	info := Info{Key: sum, SHA256: sum, Size: size}
	final := d.path(sum)

	// Identical bytes are already stored: skip the fsync, which is the
	// expensive part of a large Put. The link below still settles races.
	// Touching the file records that a new upload relies on these bytes,
	// so retention, or the cleanup of a failed upload that stored them,
	// spares them (see DeleteIfUnchanged). A stored file of another size
	// is damaged (cut short on a failing disk, or by a partial restore):
	// these bytes replace it, or every later upload of them would be
	// accepted onto it and fail its processing.
	damaged := false
	if fi, err := os.Stat(final); err == nil && fi.Mode().IsRegular() && fi.Size() != size {
		damaged = true
	} else if touch(final) {
		return d.existing(info, final)
	}

	// Stored files are never modified; 0o644 lets other users (a backup
	// job, a debugging operator) read them, as the 0o755 directories do.
	if err := tmp.Chmod(0o644); err != nil {
		return Info{}, fmt.Errorf("put blob %s: chmod temp file: %w", sum, err)
	}
	if err := tmp.Sync(); err != nil {
		return Info{}, fmt.Errorf("put blob %s: sync temp file: %w", sum, err)
	}
	closed = true
	if err := tmp.Close(); err != nil {
		return Info{}, fmt.Errorf("put blob %s: close temp file: %w", sum, err)
	}
	if err := d.makeFanOut(sum); err != nil {
		return Info{}, fmt.Errorf("put blob %s: %w", sum, err)
	}
	// The bytes' time of storing, should this Put publish them: the link
	// keeps it, and a Put of identical bytes after it touches the file.
	written, err := os.Stat(tmp.Name())
	if err != nil {
		return Info{}, fmt.Errorf("put blob %s: %w", sum, err)
	}

	if damaged {
		out, renamed, err := d.replaceDamaged(info, tmp.Name(), final, written)
		removeTemp = !renamed
		return out, err
	}
	return d.link(info, tmp.Name(), final, written)
}

// link publishes the bytes of the temp file tmp at final with a hard link.
//
// A hard link, unlike a rename, fails if the final name exists. That makes
// publishing a create-if-absent step that is atomic across goroutines and
// processes, so exactly one concurrent Put of the same bytes reports
// Created; a rename would silently replace the file and let every writer
// claim it. If the file another Put published is removed before it is
// touched (the cleanup of that Put's failed upload), this Put publishes its
// own.
func (d *Dir) link(info Info, tmp, final string, written os.FileInfo) (Info, error) {
	var err error
	for attempt := 1; ; attempt++ {
		err = os.Link(tmp, final)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
		if touch(final) {
			return d.existing(info, final)
		}
		if attempt == 3 {
			break
		}
	}
	if err != nil {
		return Info{}, fmt.Errorf("put blob %s: publish: %w", info.Key, err)
	}
	// Make the new directory entry durable before the caller reports the
	// upload as accepted.
	if err := syncDir(filepath.Dir(final)); err != nil {
		return Info{}, fmt.Errorf("put blob %s: %w", info.Key, err)
	}
	info.Created, info.LastPut = true, written.ModTime()
	return info, nil
}

// existing returns the Info of a Put whose bytes were stored already, at
// final. The Put that stored them may not have made their directory entry
// durable yet (it links, then syncs the directory): this caller is about
// to report its upload as accepted, so it syncs the directory too.
func (d *Dir) existing(info Info, final string) (Info, error) {
	if err := syncDir(filepath.Dir(final)); err != nil {
		return Info{}, fmt.Errorf("put blob %s: %w", info.Key, err)
	}
	return info, nil
}

// replaceDamaged publishes the bytes of the temp file tmp at final, where
// Put found a file of another size (damaged), and reports whether it
// renamed tmp. Its check and its rename run under the Dir's damage lock,
// which other processes sharing the directory take too (see lockDamaged):
// of several Puts replacing the same damaged file, exactly one renames its
// bytes over it and reports Created, and the others find the whole bytes
// and touch them, as over a stored file. The rename replaces the file in
// one step, so a reader never finds the name empty.
func (d *Dir) replaceDamaged(info Info, tmp, final string, written os.FileInfo) (out Info, renamed bool, err error) {
	unlock, err := d.lockDamaged()
	if err != nil {
		return Info{}, false, fmt.Errorf("put blob %s: replace damaged file: %w", info.Key, err)
	}
	defer unlock()
	fi, err := os.Stat(final)
	if errors.Is(err, fs.ErrNotExist) {
		// Removed meanwhile (a failed upload's cleanup): publish as any
		// Put does, since a Put that found no file may be linking too.
		out, err := d.link(info, tmp, final, written)
		return out, false, err
	}
	if err != nil {
		return Info{}, false, fmt.Errorf("put blob %s: replace damaged file: %w", info.Key, err)
	}
	if fi.Size() == info.Size && touch(final) {
		out, err := d.existing(info, final) // replaced by another Put
		return out, false, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return Info{}, false, fmt.Errorf("put blob %s: replace damaged file: %w", info.Key, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return Info{}, true, fmt.Errorf("put blob %s: %w", info.Key, err)
	}
	info.Created, info.LastPut = true, written.ModTime()
	return info, true, nil
}

// damageLockName is the file in Dir/tmp that lockDamaged locks. The
// start-up sweep leaves it alone: it has no temp prefix.
const damageLockName = "damaged.lock"

// lockDamaged takes the Dir's damage lock: a mutex for the goroutines of
// this process, and an exclusive flock(2) on Dir/tmp/damaged.lock for the
// processes that share the directory where the platform has one (see
// flockFile). Damaged files are rare, so one lock for every key costs
// nothing that matters.
func (d *Dir) lockDamaged() (unlock func(), err error) {
	d.damagedMu.Lock()
	f, err := os.OpenFile(filepath.Join(d.tmp, damageLockName), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		d.damagedMu.Unlock()
		return nil, err
	}
	if err := flockFile(f); err != nil {
		_ = f.Close()
		d.damagedMu.Unlock()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() {
		_ = f.Close() // closing the file releases the flock
		d.damagedMu.Unlock()
	}, nil
}

// touch records that a Put stored the bytes at path again, by moving the
// file's modification time, and reports whether the file was there, under
// that name, throughout: a touch of a file that DeleteIfUnchanged took out
// of its name in the meantime does not count, and the Put stores its own
// copy. (A touch refused for another reason, a file of another owner,
// counts as done: the bytes are there.)
//
// The time set is 2 s ahead of now, so that it differs from the time the
// bytes were written even on file systems that count in seconds.
func touch(path string) bool {
	before, err := os.Stat(path)
	if err != nil {
		return false
	}
	now := time.Now().Add(2 * time.Second)
	if err := os.Chtimes(path, now, now); errors.Is(err, fs.ErrNotExist) {
		return false
	}
	after, err := os.Stat(path)
	return err == nil && os.SameFile(before, after)
}

// copyBufferPool holds the copy buffers of finished Puts for the next
// ones, so that a stream of uploads does not allocate megabytes each.
var copyBufferPool = sync.Pool{New: func() any {
	b := make([]byte, copyBufferSize)
	return &b
}}

// copyHashed copies at most maxBytes from r into w and returns the hex
// SHA-256 and the size of what it copied. It returns ErrTooLarge if r holds
// more than maxBytes, and ctx's error if ctx ends during the copy.
func copyHashed(ctx context.Context, w io.Writer, r io.Reader, maxBytes int64) (string, int64, error) {
	// Reading one byte past the limit is how an oversized upload is told
	// apart from one of exactly maxBytes, without reading the rest of it.
	limit := maxBytes
	if limit < math.MaxInt64 {
		limit++
	}
	src := contextReader(ctx, io.LimitReader(r, limit))
	// Readers such as a multipart part hand out a few KiB per Read; a
	// buffer is filled from many of them before one write and one hash
	// update, so a large upload costs a few hundred writes, not tens of
	// thousands. Three stages overlap, each on its own goroutine: reading
	// the next buffer, hashing one, and writing one (to the disk's page
	// cache, with its write-back started at once, so that the fsync at
	// the end finds little left to do). A buffer goes back to the reader
	// once both the hasher and the writer are done with it.
	type chunk struct {
		buf  []byte
		refs atomic.Int32
	}
	free := make(chan *chunk, copyBuffers)
	var taken []*[]byte // from copyBufferPool; put back once all is done
	defer func() {
		for _, b := range taken {
			copyBufferPool.Put(b)
		}
	}()
	// next returns a free buffer, or one more from the pool while fewer
	// than copyBuffers are taken, or waits for one to come back.
	next := func() *chunk {
		select {
		case c := <-free:
			return c
		default:
		}
		if len(taken) < copyBuffers {
			b := copyBufferPool.Get().(*[]byte)
			taken = append(taken, b)
			return &chunk{buf: (*b)[:copyBufferSize]}
		}
		return <-free
	}
	release := func(c *chunk) {
		if c.refs.Add(-1) == 0 {
			c.buf = c.buf[:cap(c.buf)]
			free <- c
		}
	}
	toHash := make(chan *chunk, copyBuffers)
	toWrite := make(chan *chunk, copyBuffers)
	h := sha256.New()
	hashed := make(chan struct{})
	go func() {
		defer close(hashed)
		for c := range toHash {
			h.Write(c.buf)
			release(c)
		}
	}()
	werr := make(chan error, 1)
	var failed atomic.Bool
	go func() {
		var err error
		var off int64
		for c := range toWrite {
			if err == nil {
				if _, err = w.Write(c.buf); err != nil {
					failed.Store(true) // stop reading an upload that cannot be kept
				} else {
					startWriteBack(w, off, int64(len(c.buf)))
					off += int64(len(c.buf))
				}
			}
			release(c)
		}
		werr <- err
	}()
	var n int64
	var rerr error
	for {
		c := next()
		m, err := fill(src, c.buf)
		if m > 0 {
			c.buf = c.buf[:m]
			c.refs.Store(2)
			toHash <- c
			toWrite <- c
			n += int64(m)
		} else {
			free <- c
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			rerr = err
			break
		}
		if err := ctx.Err(); err != nil {
			rerr = err
			break
		}
		if failed.Load() {
			break
		}
	}
	close(toHash)
	close(toWrite)
	<-hashed
	if err := <-werr; err != nil && rerr == nil {
		rerr = err
	}
	if rerr != nil {
		return "", 0, rerr
	}
	if n > maxBytes {
		return "", 0, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, maxBytes)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// readerFunc adapts a function to io.Reader.
type readerFunc func(p []byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// fill reads into buf until it is full or r fails. Unlike io.ReadFull it
// keeps r's own error: io.EOF is the clean end, and an io.ErrUnexpectedEOF
// from r (a multipart body cut short) stays an error.
func fill(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// contextReader returns a reader that fails with ctx's error once ctx is
// done. It checks between reads: a Read already blocked in r is not
// interrupted, but a client that stops sending is caught at the next chunk,
// and an HTTP request body unblocks by itself when its connection closes.
func contextReader(ctx context.Context, r io.Reader) io.Reader {
	return readerFunc(func(p []byte) (int, error) {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		return r.Read(p)
	})
}

// makeFanOut creates the two fan-out directories for key. Each directory
// it creates is made durable in its parent, so a crash cannot lose a
// published blob together with a directory entry above it.
func (d *Dir) makeFanOut(key string) error {
	parent := d.root
	for _, name := range []string{key[0:2], key[2:4]} {
		p := filepath.Join(parent, name)
		err := os.Mkdir(p, 0o755)
		switch {
		case err == nil:
			if err := syncDir(parent); err != nil {
				return err
			}
		case !errors.Is(err, fs.ErrExist):
			return fmt.Errorf("create fan-out dir: %w", err)
		}
		parent = p
	}
	return nil
}

// syncDir fsyncs a directory so that entries added to it survive a crash.
// A file system that cannot fsync a directory (EINVAL, ENOTSUP), and
// Windows, which has no such call, count as done; any other failure (EIO)
// is returned: the entry may not survive a crash, and the upload must not
// be accepted.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOTSUP) && !errors.Is(err, errors.ErrUnsupported) {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// Open returns the stored bytes under key. See Store.Open.
func (d *Dir) Open(ctx context.Context, key string) (io.ReadCloser, error) {
	if err := d.check(ctx, key); err != nil {
		return nil, fmt.Errorf("open blob: %w", err)
	}
	f, err := os.Open(d.path(key))
	for try := 0; errors.Is(err, fs.ErrNotExist) && try < 3; try++ {
		// DeleteIfUnchanged may be looking at it, and put it back: it is
		// gone only if it is neither aside nor back under its name.
		if d.isAside(key) {
			return nil, fmt.Errorf("open blob %s: being deleted or kept; try again", key)
		}
		f, err = os.Open(d.path(key))
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("open blob %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", key, err)
	}
	return f, nil
}

// isAside reports whether DeleteIfUnchanged has key's bytes out of their
// name.
func (d *Dir) isAside(key string) bool {
	entries, err := os.ReadDir(d.tmp)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), asidePrefix+key+"-") {
			return true
		}
	}
	return false
}

// Stat returns the key and size of the bytes under key. See Store.Stat.
func (d *Dir) Stat(ctx context.Context, key string) (Info, error) {
	if err := d.check(ctx, key); err != nil {
		return Info{}, fmt.Errorf("stat blob: %w", err)
	}
	fi, err := os.Stat(d.path(key))
	if errors.Is(err, fs.ErrNotExist) {
		return Info{}, fmt.Errorf("stat blob %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return Info{}, fmt.Errorf("stat blob %s: %w", key, err)
	}
	return Info{Key: key, SHA256: key, Size: fi.Size(), LastPut: fi.ModTime()}, nil
}

// Walk lists the stored blobs. See Walker. Temp files and anything that is
// not a blob under its fan-out directories are skipped.
func (d *Dir) Walk(ctx context.Context, fn func(Info) error) error {
	level := func(dir string) ([]string, error) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, fmt.Errorf("walk blobs: %w", err)
		}
		var names []string
		for _, e := range entries {
			if e.IsDir() && len(e.Name()) == 2 && isLowerHex(e.Name()) {
				names = append(names, e.Name())
			}
		}
		return names, nil
	}
	tops, err := level(d.root)
	if err != nil {
		return err
	}
	for _, a := range tops {
		subs, err := level(filepath.Join(d.root, a))
		if err != nil {
			return err
		}
		for _, b := range subs {
			if err := ctx.Err(); err != nil {
				return err
			}
			dir := filepath.Join(d.root, a, b)
			entries, err := os.ReadDir(dir)
			if err != nil {
				return fmt.Errorf("walk blobs: %w", err)
			}
			for _, e := range entries {
				key := e.Name()
				if !e.Type().IsRegular() || !validKey(key) || key[0:2] != a || key[2:4] != b {
					continue
				}
				fi, err := e.Info()
				if errors.Is(err, fs.ErrNotExist) {
					continue // deleted meanwhile
				}
				if err != nil {
					return fmt.Errorf("walk blobs: %w", err)
				}
				if err := fn(Info{Key: key, SHA256: key, Size: fi.Size(), LastPut: fi.ModTime()}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func isLowerHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Delete removes the bytes under key. See Store.Delete.
//
// The fan-out directories are kept even when they become empty: removing
// one could race with a concurrent Put that has just created it and is
// about to link into it. There are at most 65,536 of them.
func (d *Dir) Delete(ctx context.Context, key string) error {
	if err := d.check(ctx, key); err != nil {
		return fmt.Errorf("delete blob: %w", err)
	}
	if err := os.Remove(d.path(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete blob %s: %w", key, err)
	}
	return nil
}

// DeleteIfUnchanged removes the bytes under info.Key unless a Put stored
// them after info.LastPut (from Stat, Walk, or the Put that created them):
// then another upload relies on them too. It reports whether it removed
// them; absent bytes are not an error. See Store.DeleteIfUnchanged.
//
// The file is renamed out of its name first, and looked at after: a Put of
// the same bytes that touched it before the rename is seen (and the file
// is put back); one after the rename finds no file and publishes its own
// copy. A touch always changes the time, even on file systems that count
// in seconds (see touch).
func (d *Dir) DeleteIfUnchanged(ctx context.Context, info Info) (bool, error) {
	if err := d.check(ctx, info.Key); err != nil {
		return false, fmt.Errorf("delete blob: %w", err)
	}
	final := d.path(info.Key)
	aside := filepath.Join(d.tmp, asidePrefix+info.Key+"-"+strconv.FormatUint(rand.Uint64(), 36))
	if err := os.Rename(final, aside); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("delete blob %s: %w", info.Key, err)
	}
	fi, err := os.Stat(aside)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil // put back by a start-up sweep
	}
	if err == nil && fi.ModTime().Equal(info.LastPut) {
		if err := os.Remove(aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("delete blob %s: %w", info.Key, err)
		}
		return true, nil
	}
	// Stored again meanwhile: put it back.
	if err := d.putBack(aside, info.Key); err != nil {
		return false, fmt.Errorf("delete blob %s: bytes stored again: %w", info.Key, err)
	}
	return false, nil
}

// check returns ctx's error, or ErrInvalidKey if key is not a content
// address. Open, Stat and Delete call it before touching the file system.
func (d *Dir) check(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !validKey(key) {
		return fmt.Errorf("%w: %q", ErrInvalidKey, key)
	}
	return nil
}

// path returns the final path of key, which must be valid.
func (d *Dir) path(key string) string {
	return filepath.Join(d.root, key[0:2], key[2:4], key)
}
