package cache_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/conveyor/conveyor/cache"
)

func newLLM(t *testing.T) *cache.LLM {
	t.Helper()
	llm, err := cache.NewLLM(cache.LLMConfig{Cache: newClient(t, cache.Config{})})
	if err != nil {
		t.Fatalf("NewLLM: %v", err)
	}
	return llm
}

func TestNewLLMValidate(t *testing.T) {
	t.Parallel()
	if _, err := cache.NewLLM(cache.LLMConfig{TTL: -1}); err == nil ||
		!strings.Contains(err.Error(), "Cache is required") || !strings.Contains(err.Error(), "TTL") {
		t.Errorf("NewLLM with no cache and a negative TTL = %v, want both problems reported", err)
	}
}

func TestLLMKey(t *testing.T) {
	t.Parallel()
	llm := newLLM(t)
	base := cache.LLMRequest{
		Model:  "gpt-4o-mini",
		Params: map[string]any{"temperature": 0.2, "max_tokens": 256},
		Prompt: "Summarise this document.\nBe brief.",
	}
	with := func(change func(*cache.LLMRequest)) cache.LLMRequest {
		req := base
		req.Params = map[string]any{}
		for k, v := range base.Params {
			req.Params[k] = v
		}
		change(&req)
		return req
	}
	tests := []struct {
		name     string
		req      cache.LLMRequest
		wantSame bool // as base's key
	}{
		{name: "same request", req: with(func(*cache.LLMRequest) {}), wantSame: true},
		{name: "extra whitespace", req: with(func(r *cache.LLMRequest) { r.Prompt = "  Summarise   this\tdocument. \n\n Be brief.  " }), wantSame: true},
		{name: "params built in another order", req: with(func(r *cache.LLMRequest) {
			r.Params = map[string]any{"max_tokens": 256, "temperature": 0.2}
		}), wantSame: true},
		{name: "other model", req: with(func(r *cache.LLMRequest) { r.Model = "gpt-4o" })},
		{name: "other temperature", req: with(func(r *cache.LLMRequest) { r.Params["temperature"] = 0.3 })},
		{name: "extra param", req: with(func(r *cache.LLMRequest) { r.Params["top_p"] = 0.9 })},
		{name: "no params", req: with(func(r *cache.LLMRequest) { r.Params = nil })},
		{name: "other case", req: with(func(r *cache.LLMRequest) { r.Prompt = strings.ToLower(base.Prompt) })},
		{name: "other words", req: with(func(r *cache.LLMRequest) { r.Prompt = "Summarise this document. Be long." })},
		{name: "whitespace inside a word", req: with(func(r *cache.LLMRequest) { r.Prompt = "Summa rise this document. Be brief." })},
	}
	baseKey := llm.Key(base)
	if !regexp.MustCompile(`^llm:gpt-4o-mini:[0-9a-f]{64}$`).MatchString(baseKey) {
		t.Fatalf("Key = %q, want llm:<model>:<hex sha-256>", baseKey)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if same := llm.Key(tt.req) == baseKey; same != tt.wantSame {
				t.Errorf("Key(%+v) == Key(base) is %v, want %v", tt.req, same, tt.wantSame)
			}
		})
	}

	t.Run("nil and empty params", func(t *testing.T) {
		t.Parallel()
		a := cache.LLMRequest{Model: "m", Prompt: "p"}
		b := cache.LLMRequest{Model: "m", Prompt: "p", Params: map[string]any{}}
		if llm.Key(a) != llm.Key(b) {
			t.Errorf("nil and empty params give different keys")
		}
	})
}

func TestLLMDo(t *testing.T) {
	t.Parallel()
	errAPI := errors.New("rate limited")
	tests := []struct {
		name      string
		first     func(context.Context) (string, error)
		wantFirst string
		wantErr   error
		wantCalls int32 // after a second Do of the same request
	}{
		{
			name:      "response is cached",
			first:     func(context.Context) (string, error) { return "a summary", nil },
			wantFirst: "a summary",
			wantCalls: 1,
		},
		{
			name:      "error is not cached",
			first:     func(context.Context) (string, error) { return "", errAPI },
			wantErr:   errAPI,
			wantCalls: 2,
		},
		{
			name:      "empty response is not cached",
			first:     func(context.Context) (string, error) { return "", nil },
			wantFirst: "",
			wantCalls: 2,
		},
		{
			name:      "blank response is not cached",
			first:     func(context.Context) (string, error) { return " \n", nil },
			wantFirst: " \n",
			wantCalls: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			llm := newLLM(t)
			req := cache.LLMRequest{Model: "m", Params: map[string]any{"temperature": 0}, Prompt: "Hello,   world"}
			var calls atomic.Int32

			got, err := llm.Do(t.Context(), req, func(ctx context.Context) (string, error) {
				calls.Add(1)
				return tt.first(ctx)
			})
			if !errors.Is(err, tt.wantErr) || got != tt.wantFirst {
				t.Fatalf("first Do = %q, %v; want %q, %v", got, err, tt.wantFirst, tt.wantErr)
			}

			// The same request, written with other whitespace.
			req.Prompt = " Hello, world "
			second, err := llm.Do(t.Context(), req, func(context.Context) (string, error) {
				calls.Add(1)
				return "second answer", nil
			})
			if err != nil {
				t.Fatalf("second Do: %v", err)
			}
			if calls.Load() != tt.wantCalls {
				t.Errorf("call made %d times, want %d", calls.Load(), tt.wantCalls)
			}
			want := "second answer"
			if tt.wantCalls == 1 { // served from the cache
				want = tt.wantFirst
			}
			if second != want {
				t.Errorf("second Do = %q, want %q", second, want)
			}
		})
	}
}

func TestLLMDoUnencodableParams(t *testing.T) {
	t.Parallel()
	llm := newLLM(t)
	req := cache.LLMRequest{Model: "m", Params: map[string]any{"temperature": math.NaN()}, Prompt: "p"}
	if key := llm.Key(req); key != "" {
		t.Errorf("Key = %q, want \"\" for params that JSON cannot encode", key)
	}
	_, err := llm.Do(t.Context(), req, func(context.Context) (string, error) {
		t.Error("call made for a request without a key")
		return "", nil
	})
	if err == nil {
		t.Error("Do: no error, want one")
	}
}

// plainKey is Key written the plain way, with the prompt's words joined in
// memory: TestLLMKeyStreamsWhatItWouldJoin holds Key to it.
func plainKey(req cache.LLMRequest) string {
	params := req.Params
	if params == nil {
		params = map[string]any{}
	}
	p, err := json.Marshal(params)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256([]byte(string(p) + "\n" + strings.Join(strings.Fields(req.Prompt), " ")))
	return "llm:" + req.Model + ":" + hex.EncodeToString(sum[:])
}

func TestLLMKeyStreamsWhatItWouldJoin(t *testing.T) {
	t.Parallel()
	llm := newLLM(t)
	var allBytes strings.Builder
	for c := range 256 {
		allBytes.WriteByte(byte(c))
	}
	prompts := []struct{ name, prompt string }{
		{"empty", ""},
		{"white space only", " \t\n\u00a0\u2003 "},
		{"words", "  Summarise   this\tdocument. \n\n Be brief.  "},
		{"JSON and HTML specials", `"quoted" back\slash <b>bold</b> & more`},
		{"control characters", "nul\x00 bell\x07 esc\x1b del\x7f bs\b ff\f"},
		{"line and paragraph separators", "a\u2028b\u2029c"},
		{"multibyte", "Grüße aus Köln. 日本語のテキスト。 🙂"},
		{"invalid UTF-8", "caf\xe9 \xff\xfe half\xe2\x82 end"},
		{"every byte", allBytes.String()},
		{"long", strings.Repeat("word <&> ", 2000)},
	}
	params := []map[string]any{
		nil,
		{"temperature": 0.2, "max_tokens": 256, "url": "https://example.com/v1?a=1&b=<2>", "system": "Be \"brief\"."},
		{"nested": map[string]any{"z": 1, "a": []any{"x", 2.5, nil, true}}},
	}
	for _, p := range prompts {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			for _, params := range params {
				req := cache.LLMRequest{Model: "m", Params: params, Prompt: p.prompt}
				if got, want := llm.Key(req), plainKey(req); got != want {
					t.Errorf("Key(%+v) = %s, want %s", req, got, want)
				}
			}
		})
	}
}

// TestLLMKeyAllocations: the key of a whole document as prompt allocates
// next to nothing (it took 13 times the prompt's size, in word headers and
// JSON). Not parallel: it reads the process's allocation counter.
func TestLLMKeyAllocations(t *testing.T) {
	llm := newLLM(t)
	req := cache.LLMRequest{Model: "m", Params: map[string]any{"temperature": 0}, Prompt: strings.Repeat("a\n", 4<<20)}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	key := llm.Key(req)
	runtime.ReadMemStats(&after)
	n := after.TotalAlloc - before.TotalAlloc
	t.Logf("Key of a %d-byte prompt allocated %d bytes", len(req.Prompt), n)
	if key == "" {
		t.Fatal("no key")
	}
	// It needs about 8 KiB; the margin is for what other goroutines of
	// the process allocate meanwhile.
	if n > 1<<20 {
		t.Errorf("Key of a %d-byte prompt allocated %d bytes, want at most 1 MiB", len(req.Prompt), n)
	}
}
