package cache

import (
	"bufio"
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
// level), a line break, and the normalised prompt. The prompt is normalised
// by trimming it and collapsing every run of whitespace into one space; case
// is kept, since it can change the answer. No parameters and empty
// parameters give the same key. Key returns "" if the parameters cannot be
// encoded as JSON. (The JSON holds no raw line break, so the two parts
// cannot be confused.)
//
// The prompt's words go straight into the hash: a prompt may be a whole
// document, and copying it into words took many times its size.
func (l *LLM) Key(req LLMRequest) string {
	params := req.Params
	if params == nil {
		params = map[string]any{}
	}
	// encoding/json writes map keys in sorted order, which makes this
	// encoding canonical.
	p, err := json.Marshal(params)
	if err != nil {
		return ""
	}
	h := sha256.New()
	w := bufio.NewWriterSize(h, 4<<10)
	_, _ = w.Write(p) // writes to a hash do not fail
	_ = w.WriteByte('\n')
	first := true
	for word := range strings.FieldsSeq(req.Prompt) {
		if !first {
			_ = w.WriteByte(' ')
		}
		_, _ = w.WriteString(word)
		first = false
	}
	_ = w.Flush()
	return "llm:" + req.Model + ":" + hex.EncodeToString(h.Sum(nil))
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
