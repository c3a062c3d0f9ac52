package bench_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/events"
)

// rdb is a Redis for the benchmarks that need one: REDIS_URL, or a
// throw-away redis-server started by TestMain when benchmarks run.
var rdb *redis.Client

func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f == nil || f.Value.String() == "" {
		os.Exit(m.Run())
	}
	os.Exit(withRedis(m))
}

func withRedis(m *testing.M) int {
	url := os.Getenv("REDIS_URL")
	if url == "" {
		dir, err := os.MkdirTemp("", "conveyor-hotpath-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		off := false
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r, err := embedded.StartRedis(ctx, embedded.RedisConfig{Dir: filepath.Join(dir, "redis"), AppendOnly: &off})
		cancel()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_ = r.Stop(ctx)
		}()
		url = r.URL()
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	rdb = redis.NewClient(opt)
	defer rdb.Close()
	return m.Run()
}

func email() *events.EmailRequested {
	return &events.EmailRequested{
		EmailID:     events.NewID(),
		To:          "bench@example.com",
		Subject:     "Benchmark",
		Body:        "Hello,\n\nyour report is ready. This message was sent by the Conveyor benchmark; nothing is delivered.\n",
		RequestedAt: time.Now().UTC(),
	}
}

func publisher(b *testing.B) *bus.Publisher {
	b.Helper()
	c := rdb
	if c == nil {
		// NewMessage never talks to Redis; an unconnected client will do.
		c = redis.NewClient(&redis.Options{Addr: "127.0.0.1:0"})
		b.Cleanup(func() { _ = c.Close() })
	}
	p, err := bus.NewPublisher(bus.PublisherConfig{Client: c, Source: "bench", StreamPrefix: "hotpath:"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = p.Close() })
	return p
}

// BenchmarkDecodeEmailRequested decodes and validates a payload, as every
// handler and the projector do for every message.
func BenchmarkDecodeEmailRequested(b *testing.B) {
	payload, err := json.Marshal(email())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		if _, err := events.Decode(events.TypeEmailRequested, 1, payload); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkNewMessage builds the Watermill message with the full envelope.
func BenchmarkNewMessage(b *testing.B) {
	p := publisher(b)
	ev := email()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.NewMessage(ctx, ev); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWireMarshal builds a message and marshals it to stream entry
// fields with watermill-redisstream's default marshaller, whose format bus
// keeps (bus's own marshaller is not exported).
func BenchmarkWireMarshal(b *testing.B) {
	p := publisher(b)
	ev := email()
	ctx := context.Background()
	var m redisstream.DefaultMarshallerUnmarshaller
	b.ReportAllocs()
	for b.Loop() {
		msg, err := p.NewMessage(ctx, ev)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Marshal("", msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWireUnmarshal decodes stream entry fields as go-redis returns
// them (strings) back into a message.
func BenchmarkWireUnmarshal(b *testing.B) {
	p := publisher(b)
	msg, err := p.NewMessage(context.Background(), email())
	if err != nil {
		b.Fatal(err)
	}
	var m redisstream.DefaultMarshallerUnmarshaller
	vals, err := m.Marshal("", msg)
	if err != nil {
		b.Fatal(err)
	}
	entry := map[string]any{}
	for k, v := range vals {
		switch v := v.(type) {
		case []byte:
			entry[k] = string(v)
		case string:
			entry[k] = v
		default:
			entry[k] = fmt.Sprint(v)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Unmarshal(entry); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDerivedID derives a follow-up event id, as handlers do for every
// completion event.
func BenchmarkDerivedID(b *testing.B) {
	parent := events.NewID()
	b.ReportAllocs()
	for b.Loop() {
		_ = events.DerivedID(parent, "sent")
	}
}

// BenchmarkPublishEvent publishes to a real Redis from many goroutines;
// concurrent publishes share pipelined round trips.
func BenchmarkPublishEvent(b *testing.B) {
	p := publisher(b)
	ctx := context.Background()
	ev := email()
	b.Cleanup(func() { _ = rdb.Del(context.Background(), p.Stream(events.TypeEmailRequested)).Err() })
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := p.PublishEvent(ctx, ev); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkCacheFetchHit reads a cached document view through cache.Fetch,
// the API's read path on a hit.
func BenchmarkCacheFetchHit(b *testing.B) {
	c, err := cache.New(cache.Config{Redis: rdb, Prefix: "hotpath:"})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	key := "document:" + events.NewID()
	load := func(context.Context) (api.DocumentView, error) { return documentView(), nil }
	if _, err := cache.Fetch(ctx, c, key, time.Hour, load); err != nil {
		b.Fatal(err)
	}
	miss := func(context.Context) (api.DocumentView, error) {
		b.Error("cache miss")
		return api.DocumentView{}, nil
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := cache.Fetch(ctx, c, key, time.Hour, miss); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := cache.Fetch(ctx, c, key, time.Hour, miss); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

func documentView() api.DocumentView {
	str := func(s string) *string { return &s }
	num := func(n int64) *int64 { return &n }
	now := time.Now().UTC()
	return api.DocumentView{
		DocID: events.NewID(), Status: "processed", Filename: str("report.pdf"), Size: num(123456),
		ContentType: str("application/pdf"), SHA256: str("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
		Words: num(1234), Lines: num(120), Summary: str("A short summary of the report."), UploadedAt: &now, ProcessedAt: &now,
	}
}

// BenchmarkEncodeDocumentView encodes the JSON of GET /v1/documents/{id}.
func BenchmarkEncodeDocumentView(b *testing.B) {
	v := documentView()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(v); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodeEmailView encodes the JSON of GET /v1/emails/{id}.
func BenchmarkEncodeEmailView(b *testing.B) {
	to, subj, mid := "bench@example.com", "Benchmark", "<id@conveyor>"
	now := time.Now().UTC()
	v := api.EmailView{EmailID: events.NewID(), Status: "sent", To: &to, Subject: &subj, Attempts: 1, SentAt: &now, MessageID: &mid}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(v); err != nil {
			b.Fatal(err)
		}
	}
}
