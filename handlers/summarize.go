package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/conveyor/conveyor/cache"
)

// Summarizer writes a short summary of a document's text.
type Summarizer interface {
	// Model names the summarizer and its settings; it is part of the cache
	// key, so a different model never serves another's summaries.
	Model() string
	Summarize(ctx context.Context, text string) (string, error)
}

// MaxSummaryChars bounds every summary.
const MaxSummaryChars = 280

// Extractive is the built-in summarizer: the first sentences of the text,
// up to MaxChars. It needs no network and is deterministic.
type Extractive struct {
	// MaxChars defaults to MaxSummaryChars.
	MaxChars int
}

// Model implements Summarizer.
func (e Extractive) Model() string { return fmt.Sprintf("extractive-v1-%d", e.maxChars()) }

func (e Extractive) maxChars() int {
	if e.MaxChars <= 0 {
		return MaxSummaryChars
	}
	return e.MaxChars
}

// Summarize implements Summarizer.
func (e Extractive) Summarize(_ context.Context, text string) (string, error) {
	return firstSentences(text, e.maxChars()), nil
}

// firstSentences returns whole leading sentences that fit in n characters;
// if even the first does not fit, it is cut at a word boundary with "…".
func firstSentences(text string, n int) string {
	text = strings.Join(strings.Fields(text), " ")
	if utf8.RuneCountInString(text) <= n {
		return text
	}
	end := 0 // byte offset just past the last sentence that fits
	runes := 0
	for i, r := range text {
		runes++
		if runes > n {
			break
		}
		if (r == '.' || r == '!' || r == '?') && (i+1 == len(text) || text[i+1] == ' ') {
			end = i + 1
		}
	}
	if end > 0 {
		return text[:end]
	}
	// No sentence end within n: cut at the last space, leaving room for "…".
	cut := 0
	runes = 0
	for i, r := range text {
		if runes >= n-1 {
			break
		}
		runes++
		if unicode.IsSpace(r) {
			cut = i
		}
	}
	if cut == 0 {
		cut = len(string([]rune(text)[:n-1]))
	}
	return strings.TrimSpace(text[:cut]) + "…"
}

// OpenAI summarizes with an OpenAI-compatible chat completions endpoint
// (OpenAI, vLLM, Ollama, llama.cpp server...).
type OpenAI struct {
	// URL is the API base, e.g. https://api.openai.com/v1. Required.
	URL string
	// ModelName is the model to ask. Required.
	ModelName string
	// APIKey is sent as a bearer token if set.
	APIKey string
	// Client defaults to an http.Client with a 60s timeout.
	Client *http.Client
}

// Model implements Summarizer.
func (o OpenAI) Model() string { return "openai:" + o.ModelName }

// maxPromptChars bounds the text sent to a remote model.
const maxPromptChars = 24_000

// systemPrompt is the instruction sent with every document.
var systemPrompt = fmt.Sprintf("Summarize the user's document in at most %d characters. Reply with the summary only.", MaxSummaryChars)

// cacheParams is what decides a summary besides the model's name and the
// text: the endpoint and the instructions. The LLM cache keys on it, so
// that another provider serving a model of the same name, or a changed
// prompt, does not get the summaries cached before.
func (o OpenAI) cacheParams() map[string]any {
	return map[string]any{
		"url":         strings.TrimRight(o.URL, "/"),
		"system":      systemPrompt,
		"temperature": 0,
		"max_tokens":  120,
	}
}

// Summarize implements Summarizer.
func (o OpenAI) Summarize(ctx context.Context, text string) (string, error) {
	text = cutAt(text, maxPromptChars)
	params := o.cacheParams()
	body, _ := json.Marshal(map[string]any{
		"model":       o.ModelName,
		"temperature": params["temperature"],
		"max_tokens":  params["max_tokens"],
		"messages": []map[string]string{
			{"role": "system", "content": systemPrompt},
			{"role": "user", "content": text},
		},
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(o.URL, "/")+"/chat/completions", bytes.NewReader(body))
	if err != nil {
		return "", fmt.Errorf("summarize: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	if o.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+o.APIKey)
	}
	client := o.Client
	if client == nil {
		client = &http.Client{Timeout: 60 * time.Second}
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("summarize: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("summarize: read response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("summarize: %s: %s", resp.Status, truncate(string(raw), 200))
	}
	var out struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", fmt.Errorf("summarize: decode response: %w", err)
	}
	if len(out.Choices) == 0 || strings.TrimSpace(out.Choices[0].Message.Content) == "" {
		return "", errors.New("summarize: the model returned no summary")
	}
	return firstSentences(out.Choices[0].Message.Content, MaxSummaryChars), nil
}

// Cached wraps a Summarizer with the LLM-response cache: the same model and
// text are summarized once. Errors are never cached.
type Cached struct {
	Summarizer
	LLM *cache.LLM
}

// Summarize implements Summarizer.
func (c Cached) Summarize(ctx context.Context, text string) (string, error) {
	req := cache.LLMRequest{Model: c.Summarizer.Model(), Prompt: text}
	if p, ok := c.Summarizer.(interface{ cacheParams() map[string]any }); ok {
		req.Params = p.cacheParams()
	}
	return c.LLM.Do(ctx, req, func(ctx context.Context) (string, error) {
		return c.Summarizer.Summarize(ctx, text)
	})
}

// truncate cuts s to at most n bytes and marks the cut with "…" (three
// bytes more).
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return cutAt(s, n) + "…"
}

// cutAt returns the longest prefix of s of at most n bytes that ends
// between two characters. A cut inside a multi-byte character would leave
// half of it, which JSON encoding turns into U+FFFD and a mail header
// carries as garbage.
func cutAt(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
