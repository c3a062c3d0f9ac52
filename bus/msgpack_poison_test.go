package bus

import (
	"runtime"
	"strings"
	"testing"
)

// A metadata field that declares a huge map must not make the decoder
// allocate for it: the msgpack library, which the decoder falls back to,
// sizes a map by its declared count (up to a million entries, some 80 MB).
// Not parallel: it measures the allocations of the whole process.
func TestPoisonMetadataAllocatesLittle(t *testing.T) {
	tests := []struct {
		name string
		b    string
	}{
		// 2^31-1 entries in 5 bytes: more than its bytes can hold.
		{name: "map32 header alone", b: "\xdf\x7f\xff\xff\xff"},
		{name: "map16 header alone", b: "\xde\xff\xff"},
		// A million entries with the bytes for them, the first of which
		// is not a string (0xc1 is never used): the library's path.
		{name: "library path", b: "\xdf\x00\x0f\x42\x40" + strings.Repeat("\xc1", 2_000_000)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			alloc := allocated(func() { _, err = decodeMetadataPairs(tt.b) })
			if err == nil {
				t.Fatal("decoded a malformed map")
			}
			if alloc > 1<<20 {
				t.Errorf("decoding %d bytes allocated %d bytes (%v); want under 1 MB", len(tt.b), alloc, err)
			}
		})
	}
}

// allocated returns how many bytes f allocates, measured over a few runs.
func allocated(f func()) uint64 {
	const runs = 5
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / runs
}
