package cache_test

import (
	"context"
	"errors"
	"math"
	"regexp"
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
