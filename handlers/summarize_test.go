package handlers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/internal/testenv"
)

// sentence returns a sentence of exactly n characters (n >= 2), made of
// words of four letters and ending with a period.
func sentence(n int) string {
	var b strings.Builder
	for b.Len() < n-1 {
		if b.Len() > 0 && b.Len()%5 == 4 {
			b.WriteByte(' ')
		} else {
			b.WriteByte('w')
		}
	}
	s := strings.TrimRight(b.String(), " ")
	for len(s) < n-1 {
		s += "w"
	}
	return s + "."
}

func TestExtractive(t *testing.T) {
	t.Parallel()
	for _, n := range []int{100, 200, 280, 300} {
		if got := utf8.RuneCountInString(sentence(n)); got != n {
			t.Fatalf("sentence(%d) has %d characters", n, got)
		}
	}
	s100a, s100b, s100c := sentence(100), sentence(100), sentence(100)
	s280 := sentence(280)
	tests := []struct {
		name     string
		maxChars int
		text     string
		want     string
	}{
		{name: "empty", text: "", want: ""},
		{name: "short text is kept, whitespace collapsed", text: "  Hello \n\n world.\tBye ", want: "Hello world. Bye"},
		{
			name: "whole leading sentences within 280 characters",
			text: s100a + " " + s100b + "\n\n" + s100c,
			want: s100a + " " + s100b,
		},
		{name: "a sentence ending at exactly 280 characters fits", text: s280 + " More.", want: s280},
		{
			name: "a first sentence that is too long is cut at a word with an ellipsis",
			text: strings.Repeat("word ", 60) + "end. Next one.",
			want: strings.TrimSpace(strings.Repeat("word ", 55)) + "…",
		},
		{
			name: "exclamation and question marks end sentences",
			text: "Really? Yes! " + sentence(300),
			want: "Really? Yes!",
		},
		{
			name: "multibyte sentences are counted in characters",
			text: strings.Repeat("Grüße aus Köln. ", 20),
			want: strings.TrimSpace(strings.Repeat("Grüße aus Köln. ", 17)),
		},
		{
			name: "multibyte text without spaces is cut between characters",
			text: strings.Repeat("語", 300),
			want: strings.Repeat("語", 279) + "…",
		},
		{name: "MaxChars bounds the summary", maxChars: 20, text: "One two three. Four five six.", want: "One two three."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := handlers.Extractive{MaxChars: tt.maxChars}
			got, err := e.Summarize(t.Context(), tt.text)
			if err != nil {
				t.Fatalf("Summarize: %v", err)
			}
			if got != tt.want {
				t.Errorf("Summarize =\n%q\nwant\n%q", got, tt.want)
			}
			limit := tt.maxChars
			if limit == 0 {
				limit = handlers.MaxSummaryChars
			}
			if n := utf8.RuneCountInString(got); n > limit || !utf8.ValidString(got) {
				t.Errorf("summary has %d characters (valid UTF-8: %t), want at most %d", n, utf8.ValidString(got), limit)
			}
		})
	}
	if m := (handlers.Extractive{}).Model(); m != "extractive-v1-280" {
		t.Errorf("Model = %q, want extractive-v1-280", m)
	}
	if m := (handlers.Extractive{MaxChars: 20}).Model(); m != "extractive-v1-20" {
		t.Errorf("Model = %q, want extractive-v1-20", m)
	}
}

// chatRequest is what a chat-completions endpoint receives.
type chatRequest struct {
	Path          string
	Authorization string
	ContentType   string
	Body          struct {
		Model       string   `json:"model"`
		Temperature *float64 `json:"temperature"`
		Messages    []struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		} `json:"messages"`
	}
}

// chatServer is an OpenAI-compatible chat-completions endpoint that answers
// with the replies in turn (the last one repeats) and records requests.
type chatServer struct {
	*httptest.Server
	mu       sync.Mutex
	requests []chatRequest
}

type chatReply struct {
	status int
	body   string
}

func newChatServer(t *testing.T, replies ...chatReply) *chatServer {
	t.Helper()
	s := &chatServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req chatRequest
		req.Path = r.Method + " " + r.URL.Path
		req.Authorization = r.Header.Get("Authorization")
		req.ContentType = r.Header.Get("Content-Type")
		raw, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(raw, &req.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		s.requests = append(s.requests, req)
		reply := replies[min(len(s.requests), len(replies))-1]
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(reply.status)
		_, _ = io.WriteString(w, reply.body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *chatServer) calls() []chatRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]chatRequest(nil), s.requests...)
}

func answer(content string) chatReply {
	b, _ := json.Marshal(map[string]any{
		"id":      "chatcmpl-1",
		"object":  "chat.completion",
		"choices": []map[string]any{{"index": 0, "message": map[string]string{"role": "assistant", "content": content}, "finish_reason": "stop"}},
	})
	return chatReply{http.StatusOK, string(b)}
}

func TestOpenAI(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		apiKey  string
		reply   chatReply
		want    string
		wantErr string
	}{
		{name: "summary", apiKey: "sk-test", reply: answer("  The document says hello.\n"), want: "The document says hello."},
		{name: "no API key sends no Authorization", reply: answer("Fine."), want: "Fine."},
		{
			name:  "a long answer is cut to whole sentences",
			reply: answer(sentence(200) + " " + sentence(200)),
			want:  sentence(200),
		},
		{name: "server error", reply: chatReply{http.StatusInternalServerError, `{"error":{"message":"boom"}}`}, wantErr: "500"},
		{name: "no choices", reply: chatReply{http.StatusOK, `{"choices":[]}`}, wantErr: "no summary"},
		{name: "blank answer", reply: answer("  \n"), wantErr: "no summary"},
		{name: "not JSON", reply: chatReply{http.StatusOK, `<html>proxy error</html>`}, wantErr: "decode response"},
		{name: "control characters in the answer are dropped", reply: answer("Hello\x00 world.\x01\x1b"), want: "Hello world."},
		{name: "an answer of control characters is no summary", reply: answer("\x00\x00 \x07"), wantErr: "no summary"},
		{name: "control characters in an error body are dropped", reply: chatReply{http.StatusBadGateway, "bad\x00gateway\x01"}, wantErr: "502 Bad Gateway: bad gateway"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := newChatServer(t, tt.reply)
			// The trailing slash of a base URL is not doubled.
			o := handlers.OpenAI{URL: srv.URL + "/v1/", ModelName: "test-model", APIKey: tt.apiKey, Client: srv.Client()}
			got, err := o.Summarize(t.Context(), "Hello, world.\nThis is the document.")
			if strings.ContainsFunc(got, isControl) || err != nil && strings.ContainsFunc(err.Error(), isControl) {
				t.Errorf("Summarize = %q, %v: holds a control character", got, err)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Summarize = %q, %v; want an error containing %q", got, err, tt.wantErr)
				}
			} else if err != nil || got != tt.want {
				t.Fatalf("Summarize = %q, %v; want %q", got, err, tt.want)
			}

			reqs := srv.calls()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			req := reqs[0]
			if req.Path != "POST /v1/chat/completions" || req.ContentType != "application/json" {
				t.Errorf("request = %s with Content-Type %q, want POST /v1/chat/completions with JSON", req.Path, req.ContentType)
			}
			wantAuth := ""
			if tt.apiKey != "" {
				wantAuth = "Bearer " + tt.apiKey
			}
			if req.Authorization != wantAuth {
				t.Errorf("Authorization = %q, want %q", req.Authorization, wantAuth)
			}
			b := req.Body
			if b.Model != "test-model" || b.Temperature == nil || *b.Temperature != 0 {
				t.Errorf("model %q, temperature %v; want test-model at temperature 0", b.Model, b.Temperature)
			}
			if len(b.Messages) != 2 || b.Messages[0].Role != "system" || b.Messages[1].Role != "user" ||
				b.Messages[1].Content != "Hello, world.\nThis is the document." ||
				!strings.Contains(b.Messages[0].Content, fmt.Sprint(handlers.MaxSummaryChars)) {
				t.Errorf("messages = %+v, want a system prompt with the limit and the text as the user message", b.Messages)
			}
		})
	}
	if m := (handlers.OpenAI{ModelName: "gpt-x"}).Model(); m != "openai:gpt-x" {
		t.Errorf("Model = %q, want openai:gpt-x", m)
	}
}

// isControl reports the C0 control characters but tab, LF and CR: none may
// reach a summary or a failure reason (PostgreSQL text cannot hold NUL).
func isControl(r rune) bool { return r < 0x20 && r != '\t' && r != '\n' && r != '\r' }

// TestOpenAIErrorClassification: a request the endpoint refuses as such
// (too long for the context, malformed) fails the same way on every retry,
// so its error is permanent; rate limits and server errors are transient.
func TestOpenAIErrorClassification(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name          string
		status        int
		retryAfter    string
		wantPermanent bool
		wantErr       string
	}{
		{name: "bad request", status: http.StatusBadRequest, wantPermanent: true, wantErr: "400"},
		{name: "too large", status: http.StatusRequestEntityTooLarge, wantPermanent: true, wantErr: "413"},
		{name: "unprocessable", status: http.StatusUnprocessableEntity, wantPermanent: true, wantErr: "422"},
		{name: "rate limited", status: http.StatusTooManyRequests, retryAfter: "30", wantErr: "429 Too Many Requests (retry after 30)"},
		{name: "server error", status: http.StatusInternalServerError, wantErr: "500"},
		{name: "unavailable", status: http.StatusServiceUnavailable, retryAfter: "Wed, 21 Oct 2015 07:28:00 GMT", wantErr: "(retry after Wed, 21 Oct 2015 07:28:00 GMT)"},
		// A wrong key or URL is the operator's to fix; the documents
		// are fine and wait for the fix.
		{name: "unauthorized", status: http.StatusUnauthorized, wantErr: "401"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				w.WriteHeader(tt.status)
				_, _ = io.WriteString(w, `{"error":{"message":"maximum context length exceeded"}}`)
			}))
			t.Cleanup(srv.Close)
			o := handlers.OpenAI{URL: srv.URL, ModelName: "m", Client: srv.Client()}
			for _, s := range []handlers.Summarizer{o, handlers.Cached{Summarizer: o, LLM: newLLMCache(t)}} {
				got, err := s.Summarize(t.Context(), "Some text.")
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "maximum context length") {
					t.Fatalf("%T: Summarize = %q, %v; want an error containing %q and the body", s, got, err, tt.wantErr)
				}
				if bus.IsPermanent(err) != tt.wantPermanent {
					t.Errorf("%T: Summarize = %v: permanent %t, want %t", s, err, bus.IsPermanent(err), tt.wantPermanent)
				}
			}
		})
	}
}

// TestCachedDropsControlCharacters: a summary cached before summaries were
// cleaned (24 hours of them) is cleaned on its way out.
func TestCachedDropsControlCharacters(t *testing.T) {
	t.Parallel()
	llm := newLLMCache(t)
	s := handlers.Cached{Summarizer: handlers.Extractive{}, LLM: llm}
	text := "The document."
	if _, err := llm.Do(t.Context(), cache.LLMRequest{Model: s.Model(), Prompt: text}, func(context.Context) (string, error) {
		return "The\x00document.\x01", nil
	}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Summarize(t.Context(), text); err != nil || got != "The document." {
		t.Errorf("Summarize = %q, %v; want %q", got, err, "The document.")
	}
}

// TestOpenAIPromptLimit checks that a long document is cut to the prompt
// limit between characters, never inside one.
func TestOpenAIPromptLimit(t *testing.T) {
	t.Parallel()
	srv := newChatServer(t, answer("Short."))
	// 'a' then two-byte characters: the 24,000-byte limit falls inside one.
	text := "a" + strings.Repeat("é", 13_000)
	o := handlers.OpenAI{URL: srv.URL, ModelName: "m"}
	if _, err := o.Summarize(t.Context(), text); err != nil {
		t.Fatal(err)
	}
	reqs := srv.calls()
	if len(reqs) != 1 || len(reqs[0].Body.Messages) != 2 {
		t.Fatalf("requests = %+v, want one with two messages", reqs)
	}
	got := reqs[0].Body.Messages[1].Content
	if want := "a" + strings.Repeat("é", 11_999); got != want {
		t.Errorf("prompt of %d bytes (valid UTF-8 %t, replacement characters %d), want the %d-byte prefix that ends between characters",
			len(got), utf8.ValidString(got), strings.Count(got, "\uFFFD"), len(want))
	}
}

func newLLMCache(t *testing.T) *cache.LLM {
	t.Helper()
	c, err := cache.New(cache.Config{Redis: testenv.Redis(t), Prefix: testenv.Prefix(t), Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	llm, err := cache.NewLLM(cache.LLMConfig{Cache: c})
	if err != nil {
		t.Fatal(err)
	}
	return llm
}

func TestCached(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		replies []chatReply
		// texts are summarized in turn; wantErrs[i] says whether call i fails.
		texts     []string
		wantErrs  []bool
		wantCalls int
	}{
		{
			name:      "the same text is summarized once",
			replies:   []chatReply{answer("Summary one.")},
			texts:     []string{"The same text.", "The same text.", "  The same\ntext. "},
			wantErrs:  []bool{false, false, false},
			wantCalls: 1,
		},
		{
			name:      "another text is summarized again",
			replies:   []chatReply{answer("Summary.")},
			texts:     []string{"One text.", "Another text."},
			wantErrs:  []bool{false, false},
			wantCalls: 2,
		},
		{
			name:      "an error is not cached",
			replies:   []chatReply{{http.StatusInternalServerError, "overloaded"}, answer("Late summary.")},
			texts:     []string{"Some text.", "Some text.", "Some text."},
			wantErrs:  []bool{true, false, false},
			wantCalls: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := newChatServer(t, tt.replies...)
			s := handlers.Cached{
				Summarizer: handlers.OpenAI{URL: srv.URL, ModelName: "m", Client: srv.Client()},
				LLM:        newLLMCache(t),
			}
			if s.Model() != "openai:m" {
				t.Errorf("Model = %q, want the inner summarizer's", s.Model())
			}
			var first string
			for i, text := range tt.texts {
				got, err := s.Summarize(t.Context(), text)
				if (err != nil) != tt.wantErrs[i] {
					t.Fatalf("call %d: Summarize = %q, %v; want error %t", i, got, err, tt.wantErrs[i])
				}
				if err == nil && first == "" {
					first = got
				}
				if err == nil && got != first {
					t.Errorf("call %d: Summarize = %q, want %q", i, got, first)
				}
			}
			if n := len(srv.calls()); n != tt.wantCalls {
				t.Errorf("the model was asked %d times, want %d", n, tt.wantCalls)
			}
		})
	}
}

// TestCachedKeysOnTheEndpoint: two providers serving a model of the same
// name do not share cached summaries.
func TestCachedKeysOnTheEndpoint(t *testing.T) {
	t.Parallel()
	llm := newLLMCache(t)
	a := newChatServer(t, answer("Summary from A."))
	b := newChatServer(t, answer("Summary from B."))
	text := "The same document, summarized by two providers."
	for _, tt := range []struct {
		srv  *chatServer
		want string
	}{{a, "Summary from A."}, {b, "Summary from B."}, {a, "Summary from A."}} {
		s := handlers.Cached{Summarizer: handlers.OpenAI{URL: tt.srv.URL, ModelName: "m", Client: tt.srv.Client()}, LLM: llm}
		if got, err := s.Summarize(t.Context(), text); err != nil || got != tt.want {
			t.Errorf("Summarize through %s = %q, %v; want %q", tt.srv.URL, got, err, tt.want)
		}
	}
	if na, nb := len(a.calls()), len(b.calls()); na != 1 || nb != 1 {
		t.Errorf("providers asked %d and %d times, want once each", na, nb)
	}
}
