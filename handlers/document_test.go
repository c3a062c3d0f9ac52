package handlers_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/internal/testenv"
)

// put stores data and returns its upload event.
func put(t *testing.T, blobs blob.Store, filename, data, notify string) *events.DocumentUploaded {
	t.Helper()
	info, err := blobs.Put(t.Context(), strings.NewReader(data), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	return &events.DocumentUploaded{
		DocID:      events.NewID(),
		Filename:   filename,
		Size:       info.Size,
		SHA256:     info.SHA256,
		BlobKey:    info.Key,
		Notify:     notify,
		UploadedAt: time.Now(),
	}
}

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func newProcessor(t *testing.T, cfg handlers.DocumentProcessorConfig) *handlers.DocumentProcessor {
	t.Helper()
	cfg.Logger = discard
	p, err := handlers.NewDocumentProcessor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// checkNotification checks the email.requested events of one handled
// upload: none without Notify, else n identical requests.
func checkNotification(t *testing.T, f *busFixture, env events.Envelope, up *events.DocumentUploaded, n int, subject string, bodyHas ...string) {
	t.Helper()
	got := f.entries(t, events.TypeEmailRequested)
	if up.Notify == "" {
		if len(got) != 0 {
			t.Errorf("%d email.requested published without a notify address", len(got))
		}
		return
	}
	if len(got) != n {
		t.Fatalf("%d email.requested published, want %d", len(got), n)
	}
	for _, e := range got {
		checkEnvelope(t, e, events.TypeEmailRequested, events.DerivedID(env.ID, "notify"), env)
		req := decode[events.EmailRequested](t, e)
		if req.EmailID != events.DerivedID(env.ID, "notify-email") || req.To != up.Notify || req.DocID != up.DocID || req.Subject != subject {
			t.Errorf("email.requested = %+v, want email id %s to %s about %s with subject %q",
				req, events.DerivedID(env.ID, "notify-email"), up.Notify, up.DocID, subject)
		}
		for _, s := range bodyHas {
			if !strings.Contains(req.Body, s) {
				t.Errorf("email body %q does not contain %q", req.Body, s)
			}
		}
		if err := req.Validate(); err != nil {
			t.Errorf("email.requested is invalid: %v", err)
		}
	}
}

func TestDocumentProcessed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		filename string
		data     string
		declared string
		notify   string
		want     events.DocumentProcessed
	}{
		{
			name:     "plain text with a notification",
			filename: "notes.txt",
			data:     "Hello world. Second sentence.\nLine two.\n",
			notify:   "Reader <reader@example.com>",
			want:     events.DocumentProcessed{ContentType: "text/plain", Words: 6, Lines: 2, Summary: "Hello world. Second sentence. Line two."},
		},
		{
			name:     "CSV without a notification",
			filename: "people.csv",
			data:     "name,age\nalice,30\nbob,41\n",
			want:     events.DocumentProcessed{ContentType: "text/csv", Words: 6, Lines: 3, Summary: "name age alice 30 bob 41"},
		},
		{
			name:     "the declared content type is ignored",
			filename: "page.pdf",
			data:     "<html><body><h1>Title</h1><p>Body text.</p></body></html>",
			declared: "application/pdf",
			notify:   "reader@example.com",
			want:     events.DocumentProcessed{ContentType: "text/html", Words: 3, Lines: 2, Summary: "Title Body text."},
		},
		{
			name:     "a long document gets a short summary",
			filename: "long.md",
			data:     strings.Repeat("This is one sentence of the document. ", 20),
			want: events.DocumentProcessed{ContentType: "text/markdown", Words: 140, Lines: 1,
				Summary: strings.TrimSpace(strings.Repeat("This is one sentence of the document. ", 7))},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub})
			up := put(t, blobs, tt.filename, tt.data, tt.notify)
			up.DeclaredContentType = tt.declared
			ctx, env := handling(t, events.TypeDocumentUploaded)
			if err := p.Handle(ctx, up); err != nil {
				t.Fatalf("Handle: %v", err)
			}

			got := f.entries(t, events.TypeDocumentProcessed)
			if len(got) != 1 {
				t.Fatalf("%d document.processed published, want 1", len(got))
			}
			checkEnvelope(t, got[0], events.TypeDocumentProcessed, events.DerivedID(env.ID, "processed"), env)
			done := decode[events.DocumentProcessed](t, got[0])
			if done.ProcessedAt.IsZero() {
				t.Error("processed_at is not set")
			}
			tt.want.DocID, tt.want.ProcessedAt = up.DocID, done.ProcessedAt
			if *done != tt.want {
				t.Errorf("document.processed =\n%+v\nwant\n%+v", *done, tt.want)
			}
			if n := len(f.entries(t, events.TypeDocumentProcessingFailed)); n != 0 {
				t.Errorf("%d document.processing_failed published too", n)
			}
			checkNotification(t, f, env, up, 1, "Document "+tt.filename+" processed", tt.want.Summary, "words", "lines")
		})
	}
}

// TestDocumentRedelivery handles one event twice, as at-least-once delivery
// may: the second run publishes the same events with the same ids, for
// the consumers to absorb.
func TestDocumentRedelivery(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		data    string
		outcome string // the event type published
		suffix  string // of its derived id
	}{
		{name: "processed", data: "Some words here.", outcome: events.TypeDocumentProcessed, suffix: "processed"},
		{name: "failed", data: string(pngHeader), outcome: events.TypeDocumentProcessingFailed, suffix: "failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub})
			up := put(t, blobs, "doc.txt", tt.data, "reader@example.com")
			ctx, env := handling(t, events.TypeDocumentUploaded)
			for i := range 2 {
				if err := p.Handle(ctx, up); err != nil {
					t.Fatalf("Handle %d: %v", i+1, err)
				}
			}
			got := f.entries(t, tt.outcome)
			if len(got) != 2 {
				t.Fatalf("%d %s entries after two runs, want 2", len(got), tt.outcome)
			}
			for _, e := range got {
				checkEnvelope(t, e, tt.outcome, events.DerivedID(env.ID, tt.suffix), env)
			}
			checkNotification(t, f, env, up, 2, "Document doc.txt "+tt.suffix)
		})
	}
}

// pngHeader is enough of a PNG for sniffing.
var pngHeader = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89")

func TestDocumentProcessingFailed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		filename string
		data     string
		// change alters the upload event after the bytes were stored.
		change   func(up *events.DocumentUploaded)
		maxBytes int64
		notify   string
		wantType string
		reason   string
	}{
		{
			name:   "SHA-256 mismatch",
			data:   "The stored bytes.",
			change: func(up *events.DocumentUploaded) { up.SHA256 = sha("The uploaded bytes.") },
			reason: "fail the SHA-256 check",
		},
		{
			name:   "stored bytes longer than uploaded",
			data:   "The stored bytes.",
			change: func(up *events.DocumentUploaded) { up.Size-- },
			reason: "stored size differs from the uploaded size 16",
		},
		{
			name:   "stored bytes shorter than uploaded",
			data:   "The stored bytes.",
			change: func(up *events.DocumentUploaded) { up.Size++ },
			reason: "stored size differs from the uploaded size 18",
		},
		{
			name:     "unsupported content type",
			filename: "photo.txt",
			data:     string(pngHeader),
			notify:   "reader@example.com",
			wantType: "image/png",
			reason:   "unsupported content type image/png",
		},
		{name: "empty document", data: "", reason: "the document is empty"},
		{name: "corrupt CSV", filename: "bad.csv", data: "a,b\nx\"y,z\nc,d\n", wantType: "text/csv", reason: "corrupt CSV"},
		{name: "larger than the processing limit", data: "twelve bytes", maxBytes: 8, reason: "exceeds the processing limit of 8 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub, MaxBytes: tt.maxBytes})
			filename := tt.filename
			if filename == "" {
				filename = "doc.txt"
			}
			up := put(t, blobs, filename, tt.data, tt.notify)
			if tt.change != nil {
				tt.change(up)
			}
			ctx, env := handling(t, events.TypeDocumentUploaded)
			// A property of the input: retrying cannot help, so the
			// outcome is published and the event acked.
			if err := p.Handle(ctx, up); err != nil {
				t.Fatalf("Handle = %v, want nil", err)
			}
			got := f.entries(t, events.TypeDocumentProcessingFailed)
			if len(got) != 1 {
				t.Fatalf("%d document.processing_failed published, want 1", len(got))
			}
			checkEnvelope(t, got[0], events.TypeDocumentProcessingFailed, events.DerivedID(env.ID, "failed"), env)
			failed := decode[events.DocumentProcessingFailed](t, got[0])
			if failed.DocID != up.DocID || failed.ContentType != tt.wantType || !strings.Contains(failed.Reason, tt.reason) || failed.FailedAt.IsZero() {
				t.Errorf("document.processing_failed = %+v, want content type %q and a reason containing %q", failed, tt.wantType, tt.reason)
			}
			if n := len(f.entries(t, events.TypeDocumentProcessed)); n != 0 {
				t.Errorf("%d document.processed published too", n)
			}
			checkNotification(t, f, env, up, 1, "Document "+filename+" failed", tt.reason)
		})
	}
}

func TestDocumentNotificationSubject(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		filename string
		want     string
	}{
		{
			// The filename is cut to 100 bytes, inside the 50th "é".
			name:     "a long multibyte name is cut between characters",
			filename: "a" + strings.Repeat("é", 70),
			want:     "Document a" + strings.Repeat("é", 49) + "… processed",
		},
		{
			name:     "control characters cannot add headers",
			filename: "a\r\nBcc: x@example.com.txt",
			want:     "Document aBcc: x@example.com.txt processed",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub})
			up := put(t, blobs, tt.filename, "Plain words.", "reader@example.com")
			if err := up.Validate(); err != nil {
				t.Fatalf("upload event is invalid: %v", err)
			}
			ctx, env := handling(t, events.TypeDocumentUploaded)
			if err := p.Handle(ctx, up); err != nil {
				t.Fatalf("Handle: %v", err)
			}
			checkNotification(t, f, env, up, 1, tt.want)
			for _, e := range f.entries(t, events.TypeEmailRequested) {
				if s := decode[events.EmailRequested](t, e).Subject; !utf8.ValidString(s) || strings.ContainsRune(s, utf8.RuneError) {
					t.Errorf("subject %q holds a broken character", s)
				}
			}
		})
	}
}

// closedPublisher returns a real publisher whose Redis client is closed, so
// that every publish fails.
func closedPublisher(t *testing.T) *bus.Publisher {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	if err := rdb.Close(); err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: testenv.Prefix(t), Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

func TestDocumentPublishErrorIsRetried(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		data    string
		corrupt bool // the stored bytes fail the SHA-256 check
		wantErr string
	}{
		{name: "processed", data: "Fine text.", wantErr: "publish document.processed"},
		{name: "failed", data: "Fine text.", corrupt: true, wantErr: "publish document.processing_failed"},
		{name: "unsupported", data: string(pngHeader), wantErr: "publish document.processing_failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			blobs := newBlobs(t)
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: closedPublisher(t)})
			up := put(t, blobs, "doc.txt", tt.data, "")
			if tt.corrupt {
				up.SHA256 = sha("other bytes")
			}
			ctx, _ := handling(t, events.TypeDocumentUploaded)
			err := p.Handle(ctx, up)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || bus.IsPermanent(err) {
				t.Fatalf("Handle = %v, want a retryable error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestDocumentSummarizerErrorIsRetried(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	blobs := newBlobs(t)
	srv := newChatServer(t, chatReply{http.StatusServiceUnavailable, "busy"})
	p := newProcessor(t, handlers.DocumentProcessorConfig{
		Blobs:      blobs,
		Publisher:  f.pub,
		Summarizer: handlers.OpenAI{URL: srv.URL, ModelName: "m", Client: srv.Client()},
	})
	up := put(t, blobs, "doc.txt", "Words to summarize.", "reader@example.com")
	ctx, _ := handling(t, events.TypeDocumentUploaded)
	if err := p.Handle(ctx, up); err == nil || !strings.Contains(err.Error(), "503") || bus.IsPermanent(err) {
		t.Fatalf("Handle = %v, want a retryable summarizer error", err)
	}
	for _, typ := range []string{events.TypeDocumentProcessed, events.TypeDocumentProcessingFailed, events.TypeEmailRequested} {
		if n := len(f.entries(t, typ)); n != 0 {
			t.Errorf("%d %s published before the summary", n, typ)
		}
	}
}

// flakyBlobs is a real store whose first Opens fail as an unreachable
// storage would (with err, errStorageDown if nil).
type flakyBlobs struct {
	blob.Store
	failures int
	err      error

	mu    sync.Mutex
	opens int
}

var errStorageDown = errors.New("blob storage unreachable")

func (b *flakyBlobs) Open(ctx context.Context, key string) (io.ReadCloser, error) {
	b.mu.Lock()
	b.opens++
	fail := b.opens <= b.failures
	b.mu.Unlock()
	if fail && b.err != nil {
		return nil, b.err
	}
	if fail {
		return nil, errStorageDown
	}
	return b.Store.Open(ctx, key)
}

func (b *flakyBlobs) openCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.opens
}

// runTwoAttemptRouter runs p in a router of the document processor's
// group (returned), with two attempts per event and quick retries.
func runTwoAttemptRouter(t *testing.T, f *busFixture, p *handlers.DocumentProcessor) string {
	t.Helper()
	router, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "test-1", StreamPrefix: f.prefix, DrainTimeout: 5 * time.Second, Logger: discard,
	})
	if err != nil {
		t.Fatal(err)
	}
	group := f.prefix + handlers.DocumentGroup
	retry := bus.RetryPolicy{MaxAttempts: 2, MinBackoff: 10 * time.Millisecond}
	if err := bus.Handle(router, group, p.Handle, bus.WithRetry(retry)); err != nil {
		t.Fatal(err)
	}
	runRouter(t, router)
	return group
}

// TestDocumentThroughRouter runs the processor in a real router with two
// attempts per event: a transient failure is retried, and on the last
// attempt the processor publishes document.processing_failed itself
// instead of leaving the event to the dead-letter stream.
func TestDocumentThroughRouter(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		failures  int
		outcome   string
		suffix    string
		openErr   error // what the failing Opens return; errStorageDown if nil
		reason    string
		cause     string // also in the reason
		wantOpens int
	}{
		{name: "recovers on the retry", failures: 1, outcome: events.TypeDocumentProcessed, suffix: "processed", wantOpens: 2},
		{
			name:      "gives up on the last attempt",
			failures:  1000,
			outcome:   events.TypeDocumentProcessingFailed,
			suffix:    "failed",
			reason:    "gave up after 2 attempts: open blob of document",
			cause:     errStorageDown.Error(),
			wantOpens: 2,
		},
		// Bytes missing where the api stored them: this replica's
		// BLOB_DIR is not the api's (not mounted yet, not shared). A
		// retry, maybe on another replica, finds them.
		{
			name: "missing bytes are found on the retry", failures: 1, openErr: blob.ErrNotFound,
			outcome: events.TypeDocumentProcessed, suffix: "processed", wantOpens: 2,
		},
		{
			name:      "missing bytes on every attempt",
			failures:  1000,
			openErr:   blob.ErrNotFound,
			outcome:   events.TypeDocumentProcessingFailed,
			suffix:    "failed",
			reason:    "the stored bytes are missing (2 attempts)",
			wantOpens: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := &flakyBlobs{Store: newBlobs(t), failures: tt.failures, err: tt.openErr}
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub})
			group := runTwoAttemptRouter(t, f, p)

			up := put(t, blobs, "doc.txt", "Some words.", "")
			upID, err := f.pub.PublishEvent(t.Context(), up)
			if err != nil {
				t.Fatal(err)
			}
			got := f.waitEntries(t, tt.outcome, 1)
			if got[0].ID != events.DerivedID(upID, tt.suffix) {
				t.Errorf("%s id = %s, want %s derived from the upload event", tt.outcome, got[0].ID, events.DerivedID(upID, tt.suffix))
			}
			if tt.reason != "" {
				failed := decode[events.DocumentProcessingFailed](t, got[0])
				if !strings.Contains(failed.Reason, tt.reason) || !strings.Contains(failed.Reason, tt.cause) {
					t.Errorf("reason = %q, want it to contain %q and %q", failed.Reason, tt.reason, tt.cause)
				}
			}

			// The processor acked the entry itself: nothing is pending and
			// nothing was dead-lettered.
			f.waitAcked(t, events.TypeDocumentUploaded, group)
			if dead, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), group); err != nil || dead != 0 {
				t.Errorf("dead letters = %d, %v; want none", dead, err)
			}
			if n := blobs.openCount(); n != tt.wantOpens {
				t.Errorf("the blob was opened %d times, want %d", n, tt.wantOpens)
			}
			for _, typ := range []string{events.TypeDocumentProcessed, events.TypeDocumentProcessingFailed} {
				want := 0
				if typ == tt.outcome {
					want = 1
				}
				if n := len(f.entries(t, typ)); n != want {
					t.Errorf("%d %s published, want %d", n, typ, want)
				}
			}
		})
	}
}

// TestDocumentWithoutTextIsNotSummarized: a document with no text is
// processed (0 words, no summary) without asking the summarizer, which
// would answer something about the missing document.
func TestDocumentWithoutTextIsNotSummarized(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	blobs := newBlobs(t)
	srv := newChatServer(t, answer("Please provide the document."))
	p := newProcessor(t, handlers.DocumentProcessorConfig{
		Blobs:      blobs,
		Publisher:  f.pub,
		Summarizer: handlers.OpenAI{URL: srv.URL, ModelName: "m", Client: srv.Client()},
	})
	up := put(t, blobs, "blank.txt", " \n\t\n  \n", "")
	ctx, _ := handling(t, events.TypeDocumentUploaded)
	if err := p.Handle(ctx, up); err != nil {
		t.Fatalf("Handle = %v", err)
	}
	got := f.entries(t, events.TypeDocumentProcessed)
	if len(got) != 1 {
		t.Fatalf("%d document.processed published, want 1", len(got))
	}
	if ev := decode[events.DocumentProcessed](t, got[0]); ev.Words != 0 || ev.Summary != "" {
		t.Errorf("document.processed = %+v, want 0 words and no summary", ev)
	}
	if n := len(srv.calls()); n != 0 {
		t.Errorf("summarizer asked %d times, want never", n)
	}
}

// TestDocumentBytesInFlightAreBounded: documents whose bytes together pass
// MaxBytesInFlight are not processed at once; within it they are.
func TestDocumentBytesInFlightAreBounded(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name     string
		inFlight int64
		want     int32 // most documents in the summarizer at once
	}{
		{name: "two do not fit", inFlight: 12, want: 1},
		{name: "two fit", inFlight: 16, want: 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			s := &meetingSummarizer{both: make(chan struct{})}
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub, Summarizer: s, MaxBytes: 8, MaxBytesInFlight: tt.inFlight})
			ups := []*events.DocumentUploaded{put(t, blobs, "a.txt", "words a1", ""), put(t, blobs, "b.txt", "words b2", "")}
			errs := make(chan error, len(ups))
			for _, up := range ups {
				go func() {
					ctx, _ := handling(t, events.TypeDocumentUploaded)
					errs <- p.Handle(ctx, up)
				}()
			}
			for range ups {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			if got := s.most.Load(); got != tt.want {
				t.Errorf("at most %d documents in the summarizer at once, want %d", got, tt.want)
			}
		})
	}
}

// meetingSummarizer waits in Summarize until a second call arrives, or
// 2 s: two documents processed at once meet there, one at a time do not.
// (The 2 s is not a measure of speed: it is how long a document waits for
// the other one to arrive, which the machine's load can delay.)
// It records the most calls in it at once.
type meetingSummarizer struct {
	active, most atomic.Int32
	both         chan struct{}
	once         sync.Once
}

func (*meetingSummarizer) Model() string { return "meeting" }

func (m *meetingSummarizer) Summarize(ctx context.Context, text string) (string, error) {
	n := m.active.Add(1)
	defer m.active.Add(-1)
	for {
		most := m.most.Load()
		if n <= most || m.most.CompareAndSwap(most, n) {
			break
		}
	}
	if n == 2 {
		m.once.Do(func() { close(m.both) })
	}
	select {
	case <-m.both:
	case <-time.After(2 * time.Second):
	}
	return "summary", nil
}

// failingSummarizer fails every call with err.
type failingSummarizer struct {
	err   error
	calls atomic.Int32
}

func (s *failingSummarizer) Model() string { return "failing" }

func (s *failingSummarizer) Summarize(context.Context, string) (string, error) {
	s.calls.Add(1)
	return "", s.err
}

// TestDocumentSummarizerFallback: a summarizer that refuses the text for
// good, or fails on every attempt, does not fail the document: its text and
// counts are there, and it is processed with the built-in summary.
func TestDocumentSummarizerFallback(t *testing.T) {
	t.Parallel()
	const text = "The first sentence says a lot. The second one says more. A third adds little."
	want, err := handlers.Extractive{}.Summarize(t.Context(), text)
	if err != nil || want == "" {
		t.Fatalf("built-in summary = %q, %v", want, err)
	}
	tests := []struct {
		name      string
		err       error
		wantCalls int32
	}{
		{name: "permanent", err: bus.Permanent(errors.New("400: context length exceeded")), wantCalls: 1},
		{name: "failing on every attempt", err: errors.New("503: busy"), wantCalls: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			blobs := newBlobs(t)
			sum := &failingSummarizer{err: tt.err}
			p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub, Summarizer: sum})
			group := runTwoAttemptRouter(t, f, p)
			if _, err := f.pub.PublishEvent(t.Context(), put(t, blobs, "doc.txt", text, "")); err != nil {
				t.Fatal(err)
			}
			got := decode[events.DocumentProcessed](t, f.waitEntries(t, events.TypeDocumentProcessed, 1)[0])
			if got.Summary != want || got.Words != 15 {
				t.Errorf("document.processed = %+v, want the built-in summary %q and 15 words", got, want)
			}
			f.waitAcked(t, events.TypeDocumentUploaded, group)
			if n := sum.calls.Load(); n != tt.wantCalls {
				t.Errorf("summarizer called %d times, want %d", n, tt.wantCalls)
			}
			if n := len(f.entries(t, events.TypeDocumentProcessingFailed)); n != 0 {
				t.Errorf("%d document.processing_failed published", n)
			}
		})
	}
}

// fixedSummarizer answers every text with summary.
type fixedSummarizer struct{ summary string }

func (fixedSummarizer) Model() string { return "fixed" }

func (s fixedSummarizer) Summarize(context.Context, string) (string, error) { return s.summary, nil }

// TestDocumentUnpublishableOutcomeFails: an outcome that cannot pass the
// event's validation (a summary with a NUL byte, which PostgreSQL text
// cannot hold) fails the document with the reason, rather than being
// retried until it ends in the dead letters with no outcome at all.
func TestDocumentUnpublishableOutcomeFails(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	blobs := newBlobs(t)
	p := newProcessor(t, handlers.DocumentProcessorConfig{Blobs: blobs, Publisher: f.pub, Summarizer: fixedSummarizer{"a\x00b"}})
	up := put(t, blobs, "doc.txt", "Some words here.", "reader@example.com")
	ctx, _ := handling(t, events.TypeDocumentUploaded)
	if err := p.Handle(ctx, up); err != nil {
		t.Fatalf("Handle = %v, want nil: retrying cannot help", err)
	}
	got := f.entries(t, events.TypeDocumentProcessingFailed)
	if len(got) != 1 {
		t.Fatalf("%d document.processing_failed published, want 1", len(got))
	}
	if failed := decode[events.DocumentProcessingFailed](t, got[0]); !strings.Contains(failed.Reason, "cannot be published") {
		t.Errorf("reason = %q, want it to say the outcome cannot be published", failed.Reason)
	}
	if n := len(f.entries(t, events.TypeDocumentProcessed)); n != 0 {
		t.Errorf("%d document.processed published", n)
	}
}
