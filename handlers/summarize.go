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

	"github.com/conveyor/conveyor/bus"
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
// White space and control characters between words become one space.
func firstSentences(text string, n int) string {
	text = leadingWords(text, n+1)
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

// summaryScanBytes bounds the bytes of a text that an extractive summary of
// n characters reads: a few hundred KB hold its sentences many times over,
// and a document may be 32 MiB.
func summaryScanBytes(n int) int { return max(256<<10, 16*n) }

// leadingWords returns the first n characters of the words of text joined by
// single spaces, which is what firstSentences reads of
// strings.Join(strings.Fields(text), " "), in memory of O(n) where
// strings.Fields took a 16-byte header per word of the whole text. It reads
// at most summaryScanBytes(n) bytes of text, so the summary of a longer
// text is the same only if those bytes hold n characters of words (any
// text but pathological white space). Control characters separate words, as
// white space does, so that none reaches a summary.
func leadingWords(text string, n int) string {
	text = cutAt(text, summaryScanBytes(n))
	var b strings.Builder
	runes := 0
	for w := range strings.FieldsFuncSeq(text, isSeparator) {
		if runes > 0 {
			if runes == n {
				break
			}
			b.WriteByte(' ')
			runes++
		}
		for i := 0; i < len(w); runes++ {
			if runes == n {
				return b.String()
			}
			// An invalid byte is one character, as for RuneCountInString.
			_, size := utf8.DecodeRuneInString(w[i:])
			b.WriteString(w[i : i+size])
			i += size
		}
	}
	return b.String()
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
		return "", statusError(resp, raw)
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
	var summary string
	if len(out.Choices) > 0 {
		// firstSentences also drops control characters: a model can
		// answer with a NUL, which would fail document.processed.
		summary = firstSentences(out.Choices[0].Message.Content, MaxSummaryChars)
	}
	if summary == "" {
		return "", errors.New("summarize: the model returned no summary")
	}
	return summary, nil
}

// statusError describes a response other than 200 OK, with the start of its
// body. The endpoint refuses some requests as such (400 malformed, 413 too
// large, 422 beyond the context length): they fail the same on every retry,
// so their error is bus.Permanent. Rate limits (429), server errors (5xx)
// and the rest stay transient: a wrong key or URL (401, 404) is the
// operator's to fix, and the documents wait for it. Retry-After is
// reported, not honoured: the bus's backoff decides when to retry.
func statusError(resp *http.Response, body []byte) error {
	msg := "summarize: " + resp.Status
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		msg += " (retry after " + ra + ")"
	}
	// The body is the endpoint's, and may hold anything: no control
	// character may reach a failure reason.
	err := errors.New(stripControls(msg + ": " + truncate(string(body[:min(len(body), 512)]), 200)))
	switch resp.StatusCode {
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusUnprocessableEntity:
		return bus.Permanent(err)
	}
	return err
}

// stripControls makes the control characters of isControl spaces.
func stripControls(s string) string {
	return strings.Map(func(r rune) rune {
		if isControl(r) {
			return ' '
		}
		return r
	}, s)
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
	summary, err := c.LLM.Do(ctx, req, func(ctx context.Context) (string, error) {
		return c.Summarizer.Summarize(ctx, text)
	})
	// A summary cached before summaries were cleaned may hold a NUL.
	return strings.TrimSpace(stripControls(summary)), err
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
