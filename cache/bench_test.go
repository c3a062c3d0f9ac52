package cache_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/internal/testenv"
)

// benchDoc has the shape of the documents read model the api caches.
type benchDoc struct {
	ID          string    `json:"id"`
	Status      string    `json:"status"`
	Filename    string    `json:"filename"`
	Size        int64     `json:"size"`
	ContentType string    `json:"content_type"`
	Words       int       `json:"words"`
	Lines       int       `json:"lines"`
	Summary     string    `json:"summary"`
	UpdatedAt   time.Time `json:"updated_at"`
}

func benchClient(b *testing.B) *cache.Client {
	b.Helper()
	c, err := cache.New(cache.Config{Redis: testenv.Redis(b), Prefix: testenv.Prefix(b), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	return c
}

var benchValue = benchDoc{ID: "0193a4f2-6c1e-7b3a-9d2e-4f5a6b7c8d9e", Status: "processed", Filename: "quarterly-report.md",
	Size: 48213, ContentType: "text/markdown", Words: 7042, Lines: 388,
	Summary: "Revenue grew in every region. Costs fell for the third quarter in a row.", UpdatedAt: time.Now().UTC()}

// BenchmarkGet measures a cache hit through Client.Get against a real Redis:
// one GET round trip and a JSON decode.
func BenchmarkGet(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	if err := c.Set(ctx, "doc:1", benchValue, time.Minute); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		var got benchDoc
		if err := c.Get(ctx, "doc:1", &got); err != nil {
			b.Fatal(err)
		}
		if got.ID != benchValue.ID {
			b.Fatalf("got %q", got.ID)
		}
	}
}

// BenchmarkFetchHit measures the api's read path on a hit: Fetch finds the
// value and never calls load. The parallel variant shows how hits scale
// over the client's connection pool.
func BenchmarkFetchHit(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	if err := c.Set(ctx, "doc:1", benchValue, time.Minute); err != nil {
		b.Fatal(err)
	}
	load := func(context.Context) (benchDoc, error) {
		b.Error("load called on a cache hit")
		return benchDoc{}, nil
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			got, err := cache.Fetch(ctx, c, "doc:1", time.Minute, load)
			if err != nil || got.ID != benchValue.ID {
				b.Fatalf("Fetch: %+v, %v", got, err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				got, err := cache.Fetch(ctx, c, "doc:1", time.Minute, load)
				if err != nil || got.ID != benchValue.ID {
					b.Errorf("Fetch: %+v, %v", got, err)
					return
				}
			}
		})
	})
}

// BenchmarkSet measures storing a value (JSON encode and a SET with TTL).
func BenchmarkSet(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Set(ctx, "doc:1", benchValue, time.Minute); err != nil {
			b.Fatal(err)
		}
	}
}
