package blob

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// emptySHA256 is the SHA-256 of no bytes at all.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

func newTestDir(t *testing.T) (*Dir, string) {
	t.Helper()
	root := t.TempDir()
	d, err := NewDir(DirConfig{Dir: root})
	if err != nil {
		t.Fatalf("NewDir: %v", err)
	}
	return d, root
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// storedFiles lists every regular file under root, temp files included,
// relative to root; not the damage lock's file.
func storedFiles(t *testing.T, root string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		// The damage lock's file is the store's own, kept for good.
		if e.Type().IsRegular() && p != filepath.Join(root, tempDirName, damageLockName) {
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	return files
}

func assertNothingStored(t *testing.T, root string) {
	t.Helper()
	if files := storedFiles(t, root); len(files) != 0 {
		t.Errorf("files left behind: %v", files)
	}
}

func readAll(t *testing.T, d *Dir, key string) []byte {
	t.Helper()
	rc, err := d.Open(t.Context(), key)
	if err != nil {
		t.Fatalf("Open(%s): %v", key, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read %s: %v", key, err)
	}
	return b
}

func TestDirRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		data []byte
	}{
		{name: "empty", data: nil},
		{name: "one byte", data: []byte("x")},
		{name: "text", data: []byte("hello, conveyor\n")},
		{name: "several copy buffers", data: bytes.Repeat([]byte("0123456789abcdef"), 3*copyBufferSize/16+7)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			d, root := newTestDir(t)
			want := sha256Hex(tt.data)

			info, err := d.Put(ctx, bytes.NewReader(tt.data), 1<<30)
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			st, err := d.Stat(ctx, want)
			if err != nil {
				t.Fatalf("Stat: %v", err)
			}
			// LastPut is the stored file's time, as Stat reads it.
			wantInfo := Info{Key: want, SHA256: want, Size: int64(len(tt.data)), Created: true, LastPut: st.LastPut}
			if info != wantInfo || info.LastPut.IsZero() {
				t.Fatalf("Put = %+v, want %+v", info, wantInfo)
			}
			if tt.data == nil && info.Key != emptySHA256 {
				t.Errorf("empty key = %s, want %s", info.Key, emptySHA256)
			}
			if files, want := storedFiles(t, root), []string{want[0:2] + "/" + want[2:4] + "/" + want}; !slices.Equal(files, want) {
				t.Errorf("files = %v, want %v", files, want)
			}

			if got := readAll(t, d, info.Key); !bytes.Equal(got, tt.data) {
				t.Errorf("Open read %d bytes, want %d bytes as put", len(got), len(tt.data))
			}
			st, err = d.Stat(ctx, info.Key)
			if err != nil {
				t.Fatalf("Stat: %v", err)
			}
			if st.LastPut.IsZero() || time.Since(st.LastPut) > time.Hour {
				t.Errorf("Stat LastPut = %v, want the time of the Put", st.LastPut)
			}
			st.LastPut = time.Time{}
			if wantStat := (Info{Key: want, SHA256: want, Size: int64(len(tt.data))}); st != wantStat {
				t.Errorf("Stat = %+v, want %+v", st, wantStat)
			}

			if err := d.Delete(ctx, info.Key); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			if _, err := d.Open(ctx, info.Key); !errors.Is(err, ErrNotFound) {
				t.Errorf("Open after Delete: err = %v, want ErrNotFound", err)
			}
			if _, err := d.Stat(ctx, info.Key); !errors.Is(err, ErrNotFound) {
				t.Errorf("Stat after Delete: err = %v, want ErrNotFound", err)
			}
			if err := d.Delete(ctx, info.Key); err != nil {
				t.Errorf("second Delete: %v, want nil", err)
			}
			assertNothingStored(t, root)
		})
	}
}

func TestDirPutDedup(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		data string
	}{
		{name: "empty", data: ""},
		{name: "text", data: "same bytes twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			d, root := newTestDir(t)

			first, err := d.Put(ctx, strings.NewReader(tt.data), 1<<20)
			if err != nil {
				t.Fatalf("first Put: %v", err)
			}
			second, err := d.Put(ctx, strings.NewReader(tt.data), 1<<20)
			if err != nil {
				t.Fatalf("second Put: %v", err)
			}
			if !first.Created || second.Created {
				t.Errorf("Created = %v then %v, want true then false", first.Created, second.Created)
			}
			if second.Key != first.Key || second.Size != first.Size {
				t.Errorf("second Put = %+v, want key and size of %+v", second, first)
			}
			if files := storedFiles(t, root); len(files) != 1 {
				t.Errorf("files = %v, want only the blob", files)
			}
		})
	}
}

func TestDirPutMaxBytes(t *testing.T) {
	t.Parallel()
	const limit = 1000
	tests := []struct {
		name     string
		size     int
		maxBytes int64
		wantErr  error
	}{
		{name: "exactly max bytes", size: limit, maxBytes: limit},
		{name: "one below max bytes", size: limit - 1, maxBytes: limit},
		{name: "one over max bytes", size: limit + 1, maxBytes: limit, wantErr: ErrTooLarge},
		{name: "far over max bytes", size: 10 * copyBufferSize, maxBytes: limit, wantErr: ErrTooLarge},
		{name: "one byte allowed, two given", size: 2, maxBytes: 1, wantErr: ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, root := newTestDir(t)
			data := bytes.Repeat([]byte{'a'}, tt.size)

			info, err := d.Put(t.Context(), bytes.NewReader(data), tt.maxBytes)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Put: err = %v, want %v", err, tt.wantErr)
				}
				assertNothingStored(t, root)
				return
			}
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			if info.Size != int64(tt.size) || info.Key != sha256Hex(data) {
				t.Errorf("Put = %+v, want size %d and key %s", info, tt.size, sha256Hex(data))
			}
		})
	}
}

func TestDirPutRejectsNonPositiveMaxBytes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		maxBytes int64
	}{
		{name: "zero", maxBytes: 0},
		{name: "negative", maxBytes: -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, root := newTestDir(t)
			if _, err := d.Put(t.Context(), strings.NewReader(""), tt.maxBytes); err == nil {
				t.Fatal("Put: err = nil, want an error")
			}
			assertNothingStored(t, root)
		})
	}
}

var errReader = errors.New("reader broke")

// failingReader yields n bytes, then fails.
type failingReader struct {
	n int
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, errReader
	}
	p = p[:min(len(p), r.n)]
	for i := range p {
		p[i] = 'f'
	}
	r.n -= len(p)
	return len(p), nil
}

func TestDirPutReaderError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		n    int
	}{
		{name: "at once", n: 0},
		{name: "half way through the first buffer", n: copyBufferSize / 2},
		{name: "after several buffers", n: 3*copyBufferSize + 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, root := newTestDir(t)
			_, err := d.Put(t.Context(), &failingReader{n: tt.n}, 1<<30)
			if !errors.Is(err, errReader) {
				t.Fatalf("Put: err = %v, want %v", err, errReader)
			}
			assertNothingStored(t, root)
		})
	}
}

// slowReader yields a small chunk per Read, forever, after a short pause.
// onRead, if set, is called before each Read with the count of reads so far.
type slowReader struct {
	reads  int
	onRead func(reads int)
}

func (r *slowReader) Read(p []byte) (int, error) {
	if r.onRead != nil {
		r.onRead(r.reads)
	}
	r.reads++
	time.Sleep(time.Millisecond)
	p = p[:min(len(p), 512)]
	for i := range p {
		p[i] = 's'
	}
	return len(p), nil
}

func TestDirPutContextDone(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// start returns the context for Put and the reader to feed it.
		start   func(t *testing.T) (context.Context, io.Reader)
		wantErr error
	}{
		{
			name: "cancelled during the copy",
			start: func(t *testing.T) (context.Context, io.Reader) {
				ctx, cancel := context.WithCancel(t.Context())
				t.Cleanup(cancel)
				return ctx, &slowReader{onRead: func(reads int) {
					if reads == 10 {
						cancel()
					}
				}}
			},
			wantErr: context.Canceled,
		},
		{
			name: "deadline passes during the copy",
			start: func(t *testing.T) (context.Context, io.Reader) {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
				t.Cleanup(cancel)
				return ctx, &slowReader{}
			},
			wantErr: context.DeadlineExceeded,
		},
		{
			name: "cancelled before the call",
			start: func(t *testing.T) (context.Context, io.Reader) {
				ctx, cancel := context.WithCancel(t.Context())
				cancel()
				return ctx, &slowReader{}
			},
			wantErr: context.Canceled,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, root := newTestDir(t)
			ctx, r := tt.start(t)
			_, err := d.Put(ctx, r, 1<<40)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Put: err = %v, want %v", err, tt.wantErr)
			}
			assertNothingStored(t, root)
		})
	}
}

func TestDirInvalidKey(t *testing.T) {
	t.Parallel()
	valid := sha256Hex([]byte("x"))
	tests := []struct {
		name string
		key  string
	}{
		{name: "path traversal", key: "../etc/passwd"},
		{name: "path traversal padded to 64", key: "../../" + valid[6:]},
		{name: "uppercase hex", key: strings.ToUpper(valid)},
		{name: "short", key: valid[:63]},
		{name: "long", key: valid + "0"},
		{name: "empty", key: ""},
		{name: "not hex", key: "g" + valid[1:]},
		{name: "temp dir", key: "tmp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			d, _ := newTestDir(t)
			if _, err := d.Open(ctx, tt.key); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("Open: err = %v, want ErrInvalidKey", err)
			}
			if _, err := d.Stat(ctx, tt.key); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("Stat: err = %v, want ErrInvalidKey", err)
			}
			if err := d.Delete(ctx, tt.key); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("Delete: err = %v, want ErrInvalidKey", err)
			}
		})
	}
}

func TestDirConcurrentPutSameBytes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		goroutines int
		data       []byte
	}{
		{name: "small", goroutines: 8, data: []byte("raced bytes")},
		{name: "several copy buffers", goroutines: 8, data: bytes.Repeat([]byte("race"), copyBufferSize)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			d, root := newTestDir(t)

			infos := make([]Info, tt.goroutines)
			errs := make([]error, tt.goroutines)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range tt.goroutines {
				wg.Go(func() {
					<-start // line the Puts up so they really overlap
					infos[i], errs[i] = d.Put(ctx, bytes.NewReader(tt.data), 1<<30)
				})
			}
			close(start)
			wg.Wait()

			want := sha256Hex(tt.data)
			created := 0
			for i := range tt.goroutines {
				if errs[i] != nil {
					t.Errorf("Put %d: %v", i, errs[i])
					continue
				}
				if infos[i].Key != want {
					t.Errorf("Put %d key = %s, want %s", i, infos[i].Key, want)
				}
				if infos[i].Created {
					created++
				}
			}
			if created != 1 {
				t.Errorf("%d Puts reported Created, want exactly 1", created)
			}
			if got := readAll(t, d, want); !bytes.Equal(got, tt.data) {
				t.Errorf("stored %d bytes differ from the %d put", len(got), len(tt.data))
			}
			if files := storedFiles(t, root); len(files) != 1 {
				t.Errorf("files = %v, want only the blob", files)
			}
		})
	}
}

// TestDirPutStreams checks that Put does not hold an upload in memory. It
// does not call t.Parallel: the allocation counters are process-wide, and
// parallel tests only start once the sequential ones are done.
func TestDirPutStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 200 MiB; skipped with -short")
	}
	const (
		size = 200 << 20
		// allowed is a generous bound on what one Put may allocate: the
		// 64 KiB copy buffer, the hasher, the file handle and its paths.
		allowed = 4 << 20
	)
	ctx := t.Context()
	d, _ := newTestDir(t)
	source := func() io.Reader {
		return io.LimitReader(rand.NewChaCha8([32]byte{'b', 'l', 'o', 'b'}), size)
	}
	h := sha256.New()
	if _, err := io.Copy(h, source()); err != nil {
		t.Fatalf("hash source: %v", err)
	}
	want := hex.EncodeToString(h.Sum(nil))
	r := source()

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	info, err := d.Put(ctx, r, size)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatalf("Put: %v", err)
	}

	if info.Size != size || info.Key != want {
		t.Errorf("Put = %+v, want size %d and key %s", info, size, want)
	}
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("Put of %d MiB allocated %d KiB; heap in use %d KiB before, %d KiB after",
		size>>20, allocated>>10, before.HeapInuse>>10, after.HeapInuse>>10)
	if allocated > allowed {
		t.Errorf("Put allocated %d bytes for a %d byte upload, want at most %d", allocated, size, allowed)
	}
}

func TestNewDir(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     func(root string) DirConfig
		wantErr bool
	}{
		{name: "defaults", cfg: func(root string) DirConfig { return DirConfig{Dir: root} }},
		{name: "nested, missing dir is created", cfg: func(root string) DirConfig {
			return DirConfig{Dir: filepath.Join(root, "a", "b")}
		}},
		{name: "dir missing", cfg: func(string) DirConfig { return DirConfig{} }, wantErr: true},
		{name: "negative temp max age", cfg: func(root string) DirConfig {
			return DirConfig{Dir: root, TempMaxAge: -time.Second}
		}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := tt.cfg(t.TempDir())
			_, err := NewDir(cfg)
			if tt.wantErr {
				if err == nil {
					t.Fatal("NewDir: err = nil, want an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("NewDir: %v", err)
			}
			if fi, err := os.Stat(filepath.Join(cfg.Dir, tempDirName)); err != nil || !fi.IsDir() {
				t.Errorf("temp dir not created: %v", err)
			}
		})
	}
}

func TestDirConfigValidateReportsEveryProblem(t *testing.T) {
	t.Parallel()
	err := DirConfig{TempMaxAge: -time.Second}.Validate()
	if err == nil {
		t.Fatal("Validate: err = nil, want an error")
	}
	for _, want := range []string{"dir", "temp max age"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: %q does not mention %q", err, want)
		}
	}
}

func TestNewDirRemovesStaleTempFiles(t *testing.T) {
	t.Parallel()
	old := time.Now().Add(-2 * time.Hour)
	tests := []struct {
		name     string
		file     string
		modTime  time.Time
		wantKept bool
	}{
		{name: "stale temp file", file: tempPrefix + "1", modTime: old},
		{name: "fresh temp file, maybe a Put in progress", file: tempPrefix + "2", modTime: time.Now(), wantKept: true},
		{name: "stale file that Put did not create", file: "operator-notes", modTime: old, wantKept: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			p := filepath.Join(root, tempDirName, tt.file)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(p, tt.modTime, tt.modTime); err != nil {
				t.Fatal(err)
			}
			if _, err := NewDir(DirConfig{Dir: root, TempMaxAge: time.Hour}); err != nil {
				t.Fatalf("NewDir: %v", err)
			}
			_, err := os.Stat(p)
			if kept := err == nil; kept != tt.wantKept {
				t.Errorf("file kept = %v, want %v (stat: %v)", kept, tt.wantKept, err)
			}
		})
	}
}

// A Put of bytes that are already stored refreshes LastPut, so retention of
// an older upload of the same bytes spares them.
func TestPutOfStoredBytesRefreshesLastPut(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	d, err := NewDir(DirConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	info, err := d.Put(ctx, strings.NewReader("same bytes"), 100)
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-48 * time.Hour)
	if err := os.Chtimes(d.path(info.Key), old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Put(ctx, strings.NewReader("same bytes"), 100); err != nil {
		t.Fatal(err)
	}
	st, err := d.Stat(ctx, info.Key)
	if err != nil {
		t.Fatal(err)
	}
	if !st.LastPut.After(old.Add(time.Hour)) {
		t.Fatalf("LastPut = %v, not refreshed by the second Put", st.LastPut)
	}
}

// TestPutReplacesDamagedBytes: a stored file of another size than the
// bytes its name promises (cut short on a failing disk, or by a partial
// restore) is replaced by the next Put of those bytes, rather than
// trusted: every later upload of them would fail its processing.
func TestPutReplacesDamagedBytes(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	d, root := newTestDir(t)
	content := []byte("bytes that a failing disk cut short")
	info, err := d.Put(ctx, bytes.NewReader(content), 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(d.path(info.Key), 5); err != nil {
		t.Fatal(err)
	}
	again, err := d.Put(ctx, bytes.NewReader(content), 100)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Created || again.Key != info.Key {
		t.Errorf("Put over damaged bytes = %+v, want Created under key %s", again, info.Key)
	}
	if got := readAll(t, d, info.Key); !bytes.Equal(got, content) {
		t.Fatalf("stored bytes = %q, want %q", got, content)
	}
	if files := storedFiles(t, root); len(files) != 1 {
		t.Errorf("files = %v, want the one blob", files)
	}
}

// TestConcurrentPutsOverDamagedBytes: several Puts of the same bytes that
// all find the stored file damaged replace it once: exactly one reports
// Created, as over a missing file (a refused upload's cleanup removes only
// what its Put created). A reader meanwhile always finds a file under the
// name.
func TestConcurrentPutsOverDamagedBytes(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	content := bytes.Repeat([]byte("whole bytes "), 1000)
	for round := range 20 {
		d, root := newTestDir(t)
		info, err := d.Put(ctx, bytes.NewReader(content), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(d.path(info.Key), 5); err != nil {
			t.Fatal(err)
		}
		var created atomic.Int32
		var wg sync.WaitGroup
		putsDone := make(chan struct{})
		wg.Go(func() {
			for {
				select {
				case <-putsDone:
					return
				default:
				}
				rc, err := d.Open(ctx, info.Key)
				if err != nil {
					t.Errorf("round %d: Open during the Puts: %v", round, err)
					return
				}
				_ = rc.Close()
			}
		})
		var puts sync.WaitGroup
		for range 4 {
			puts.Go(func() {
				got, err := d.Put(ctx, bytes.NewReader(content), 1<<20)
				if err != nil {
					t.Error(err)
					return
				}
				if got.Created {
					created.Add(1)
				}
			})
		}
		puts.Wait()
		close(putsDone)
		wg.Wait()
		if n := created.Load(); n != 1 {
			t.Fatalf("round %d: %d of 4 Puts over damaged bytes report Created, want 1", round, n)
		}
		if got := readAll(t, d, info.Key); !bytes.Equal(got, content) {
			t.Fatalf("round %d: stored bytes are %d long, want the %d whole ones", round, len(got), len(content))
		}
		if files := storedFiles(t, root); len(files) != 1 {
			t.Fatalf("round %d: files = %v, want the one blob", round, files)
		}
	}
}

// Walk lists every stored blob once, with its size and LastPut, and
// nothing else: not temp files, not strays in the fan-out directories.
func TestDirWalk(t *testing.T) {
	t.Parallel()
	d, root := newTestDir(t)
	ctx := t.Context()
	want := map[string]int64{}
	for _, s := range []string{"one", "two", "three", ""} {
		info, err := d.Put(ctx, strings.NewReader(s), 10)
		if err != nil {
			t.Fatal(err)
		}
		want[info.Key] = int64(len(s))
	}
	key := sha256Hex([]byte("one"))
	strays := []string{
		filepath.Join(root, tempDirName, tempPrefix+"leftover"),
		filepath.Join(root, key[0:2], key[2:4], "notes.txt"),
		filepath.Join(root, key[0:2], key[2:4], strings.ToUpper(key)),
		filepath.Join(root, "zz", "README"),
	}
	for _, p := range strays {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string]int64{}
	err := d.Walk(ctx, func(info Info) error {
		if _, dup := got[info.Key]; dup {
			t.Errorf("key %s listed twice", info.Key)
		}
		if info.LastPut.IsZero() || time.Since(info.LastPut) > time.Hour {
			t.Errorf("key %s LastPut %v", info.Key, info.LastPut)
		}
		got[info.Key] = info.Size
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, want) {
		t.Errorf("Walk listed %v, want %v", got, want)
	}
	stop := errors.New("stop")
	n := 0
	if err := d.Walk(ctx, func(Info) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
		t.Errorf("Walk with fn failing: %v after %d calls, want stop after 1", err, n)
	}
}

// wantStored checks that key holds content under its name and that nothing
// is left in tmp (no temp file, no bytes aside).
func wantStored(t *testing.T, d *Dir, key, content string) {
	t.Helper()
	if got := readAll(t, d, key); string(got) != content {
		t.Fatalf("read %q, want %q", got, content)
	}
	if files, _ := os.ReadDir(d.tmp); len(files) != 0 {
		t.Fatalf("left in tmp: %v", files)
	}
}

// The cleanup of a failed upload removes the bytes its Put created, unless
// another Put stored the same bytes since: that upload relies on them.
func TestDeleteIfUnchanged(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	t.Run("untouched bytes go", func(t *testing.T) {
		t.Parallel()
		d, root := newTestDir(t)
		info, err := d.Put(ctx, strings.NewReader("mine alone"), 100)
		if err != nil || !info.Created || info.LastPut.IsZero() {
			t.Fatalf("Put = %+v, %v; want created, with LastPut", info, err)
		}
		if gone, err := d.DeleteIfUnchanged(ctx, info); !gone || err != nil {
			t.Fatalf("DeleteIfUnchanged = %v, %v; want removed", gone, err)
		}
		assertNothingStored(t, root)
		if gone, err := d.DeleteIfUnchanged(ctx, info); gone || err != nil {
			t.Fatalf("DeleteIfUnchanged of absent bytes = %v, %v; want false, nil", gone, err)
		}
	})
	t.Run("bytes stored again stay", func(t *testing.T) {
		t.Parallel()
		d, _ := newTestDir(t)
		first, err := d.Put(ctx, strings.NewReader("shared"), 100)
		if err != nil {
			t.Fatal(err)
		}
		if second, err := d.Put(ctx, strings.NewReader("shared"), 100); err != nil || second.Created {
			t.Fatalf("second Put = %+v, %v; want the stored bytes", second, err)
		}
		if gone, err := d.DeleteIfUnchanged(ctx, first); gone || err != nil {
			t.Fatalf("DeleteIfUnchanged = %v, %v; want kept: the second upload relies on them", gone, err)
		}
		wantStored(t, d, first.Key, "shared")
	})
}

// Uploads of identical bytes racing the cleanup of a failed one: every Put
// that succeeded can read its bytes afterwards, whichever order the file
// system saw the steps in.
func TestDeleteIfUnchangedRacingPuts(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	d, _ := newTestDir(t)
	for i := range 200 {
		content := "race " + strconv.Itoa(i)
		failed, err := d.Put(ctx, strings.NewReader(content), 100)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var kept Info
		var putErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			kept, putErr = d.Put(ctx, strings.NewReader(content), 100)
		}()
		go func() {
			defer wg.Done()
			if _, err := d.DeleteIfUnchanged(ctx, failed); err != nil {
				t.Error(err)
			}
		}()
		wg.Wait()
		if putErr != nil {
			t.Fatal(putErr)
		}
		if _, err := d.Stat(ctx, kept.Key); err != nil {
			t.Fatalf("round %d: the bytes of a successful Put are gone: %v", i, err)
		}
		if _, err := d.DeleteIfUnchanged(ctx, Info{Key: kept.Key, LastPut: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
	}
}

// A Put that finds the bytes stored counts on them only if its touch hit
// the file under its name: a touch racing DeleteIfUnchanged, which takes
// the file out of its name, looks at it and removes it, must not report
// the bytes there once they are gone.
func TestTouchRacingDeleteIfUnchanged(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	d, _ := newTestDir(t)
	content := []byte("contended")
	key := sha256Hex(content)
	if err := d.makeFanOut(key); err != nil {
		t.Fatal(err)
	}
	final := d.path(key)
	for i := range 5_000 {
		if err := os.WriteFile(final, content, 0o644); err != nil {
			t.Fatal(err)
		}
		info, err := d.Stat(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		var touched, removed bool
		var wg sync.WaitGroup
		start := make(chan struct{})
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			if i%2 == 0 {
				runtime.Gosched()
			}
			touched = touch(final)
		}()
		go func() {
			defer wg.Done()
			<-start
			removed, err = d.DeleteIfUnchanged(ctx, info)
		}()
		close(start)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if touched && removed {
			t.Fatalf("round %d: the touch counted on bytes DeleteIfUnchanged removed", i)
		}
		if err := os.Remove(final); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
	}
}

// Bytes a crash left aside (out of their name, in tmp) are put back when
// the store is opened, however old, rather than swept as temp files.
func TestNewDirPutsBackBytesLeftAside(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	d, err := NewDir(DirConfig{Dir: root})
	if err != nil {
		t.Fatal(err)
	}
	info, err := d.Put(t.Context(), strings.NewReader("needed"), 100)
	if err != nil {
		t.Fatal(err)
	}
	aside := filepath.Join(d.tmp, asidePrefix+info.Key+"-crash")
	if err := os.Rename(d.path(info.Key), aside); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-48 * time.Hour)
	if err := os.Chtimes(aside, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Open(t.Context(), info.Key); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("Open while the bytes are aside: %v, want an error that is not ErrNotFound", err)
	}
	d, err = NewDir(DirConfig{Dir: root, TempMaxAge: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	wantStored(t, d, info.Key, "needed")
}

// Bytes put back from aside over a copy a Put stored meanwhile keep the
// touch that made them needed: the other copy's creator, failing, must not
// remove them.
func TestPutBackKeepsTheTouchedCopy(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	root := t.TempDir()
	d, err := NewDir(DirConfig{Dir: root})
	if err != nil {
		t.Fatal(err)
	}
	first, err := d.Put(ctx, strings.NewReader("relied on"), 100)
	if err != nil {
		t.Fatal(err)
	}
	if !touch(d.path(first.Key)) { // another upload relies on them
		t.Fatal("touch of stored bytes failed")
	}
	// A crash left them aside; then a Put stored them anew.
	if err := os.Rename(d.path(first.Key), filepath.Join(d.tmp, asidePrefix+first.Key+"-crash")); err != nil {
		t.Fatal(err)
	}
	again, err := d.Put(ctx, strings.NewReader("relied on"), 100)
	if err != nil || !again.Created {
		t.Fatalf("Put = %+v, %v; want new bytes", again, err)
	}
	if d, err = NewDir(DirConfig{Dir: root}); err != nil {
		t.Fatal(err)
	}
	if gone, err := d.DeleteIfUnchanged(ctx, again); gone || err != nil {
		t.Fatalf("DeleteIfUnchanged of the second copy = %v, %v; want kept: the first was touched", gone, err)
	}
	wantStored(t, d, first.Key, "relied on")
}
