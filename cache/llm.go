package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

const defaultLLMTTL = 24 * time.Hour

// LLMConfig configures an [LLM] cache.
type LLMConfig struct {
	// Cache stores the responses. Required.
	Cache *Client

	// TTL is how long a response is kept. Defaults to 24h: a response to
	// the same model, parameters and prompt stays valid, and the cache's
	// jitter still applies.
	TTL time.Duration
}

func (c *LLMConfig) setDefaults() {
	if c.TTL == 0 {
		c.TTL = defaultLLMTTL
	}
}

// Validate reports every problem with the configuration at once.
func (c LLMConfig) Validate() error {
	var errs []error
	if c.Cache == nil {
		errs = append(errs, errors.New("cache: LLM Cache is required"))
	}
	if c.TTL < 0 {
		errs = append(errs, fmt.Errorf("cache: LLM TTL %s must not be negative", c.TTL))
	}
	return errors.Join(errs...)
}

// LLMRequest is what determines an LLM response, and so its cache key.
type LLMRequest struct {
	// Model is the model name, for instance "gpt-4o-mini".
	Model string
	// Params are the sampling parameters, for instance temperature and
	// max_tokens. They must be encodable as JSON.
	Params map[string]any
	// Prompt is the prompt. Differences in whitespace do not change the key.
	Prompt string
}

// LLM caches LLM responses, so that an identical request is answered once.
// It is safe for concurrent use.
type LLM struct {
	cache *Client
	ttl   time.Duration
}

// NewLLM returns an LLM cache for cfg, after applying defaults and
// validating it.
func NewLLM(cfg LLMConfig) (*LLM, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &LLM{cache: cfg.Cache, ttl: cfg.TTL}, nil
}

// Key returns the cache key of req: "llm:", the model, ":", and the hex
// SHA-256 of the canonical JSON of the parameters (keys sorted, at every
// level) and the normalised prompt. The prompt is normalised by trimming it
// and collapsing every run of whitespace into one space; case is kept, since
// it can change the answer. No parameters and empty parameters give the same
// key. Key returns "" if the parameters cannot be encoded as JSON.
func (l *LLM) Key(req LLMRequest) string {
	params := req.Params
	if params == nil {
		params = map[string]any{}
	}
	// encoding/json writes map keys in sorted order, which makes this
	// encoding canonical.
	canonical, err := json.Marshal(struct {
		Params map[string]any `json:"params"`
		Prompt string         `json:"prompt"`
	}{params, normalizePrompt(req.Prompt)})
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(canonical)
	return "llm:" + req.Model + ":" + hex.EncodeToString(sum[:])
}

// Do returns the cached response to req, or calls call and caches its
// response. Concurrent identical requests in one process share one call
// (see [Fetch]). Errors are never cached, nor are empty or whitespace-only
// responses: they are returned, and the next Do calls again. Do returns an
// error without calling if req has no valid key (parameters that cannot be
// encoded as JSON, or a model name containing '}').
func (l *LLM) Do(ctx context.Context, req LLMRequest, call func(ctx context.Context) (string, error)) (string, error) {
	key := l.Key(req)
	if key == "" {
		return "", fmt.Errorf("cache: LLM request for model %q: parameters cannot be encoded as JSON", req.Model)
	}
	return Fetch(ctx, l.cache, key, l.ttl, func(ctx context.Context) (string, error) {
		resp, err := call(ctx)
		if err == nil && strings.TrimSpace(resp) == "" {
			return resp, ErrNotCacheable
		}
		return resp, err
	})
}

// normalizePrompt trims s and collapses every run of whitespace into one
// space.
func normalizePrompt(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
