package blob_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"testing"

	"github.com/conveyor/conveyor/blob"
)

// smallReads hands out at most 4 KiB per Read, as a multipart part does.
type smallReads struct{ r io.Reader }

func (s smallReads) Read(p []byte) (int, error) { return s.r.Read(p[:min(len(p), 4096)]) }

// BenchmarkPut measures storing a 100 MiB upload read in 4 KiB pieces:
// hashing, writing and the final fsync. Each iteration stores new bytes
// (the first byte changes), so none is skipped as already stored.
func BenchmarkPut(b *testing.B) {
	d, err := blob.NewDir(blob.DirConfig{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	data := make([]byte, 100<<20)
	if _, err := rand.Read(data); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		data[0], data[1] = byte(i), byte(i>>8)
		info, err := d.Put(b.Context(), smallReads{bytes.NewReader(data)}, int64(len(data)))
		if err != nil {
			b.Fatal(err)
		}
		if info.Size != int64(len(data)) {
			b.Fatalf("stored %d bytes, want %d", info.Size, len(data))
		}
		b.StopTimer()
		if err := d.Delete(b.Context(), info.Key); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
