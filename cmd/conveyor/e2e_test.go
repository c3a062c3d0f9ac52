package main_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

// pipeline is a running set of conveyor processes on their own Redis and
// database.
type pipeline struct {
	t        *testing.T
	env      []string
	redis    *embedded.Redis
	rdb      *redis.Client
	api      *harness.Proc
	handlers []*harness.Proc
	proj     *harness.Proc
	mail     *testenv.Mailpit
}

type pipelineOpts struct {
	handlers   int
	extraEnv   []string
	handlerEnv func(i int) []string
}

func startPipeline(t *testing.T, o pipelineOpts) *pipeline {
	t.Helper()
	p := &pipeline{t: t}
	p.redis = testenv.StartRedis(t, embedded.RedisConfig{Dir: t.TempDir()})
	p.rdb = redis.NewClient(&redis.Options{Addr: p.redis.Addr()})
	t.Cleanup(func() { _ = p.rdb.Close() })
	p.mail = testenv.StartMailpit(t)
	p.env = append([]string{
		"REDIS_URL=" + p.redis.URL(),
		"DATABASE_URL=" + testenv.DatabaseURL(t),
		"BLOB_DIR=" + t.TempDir(),
		"SMTP_URL=" + p.mail.SMTPURL,
		"CLAIM_MIN_IDLE=2s",
		"RETRY_BACKOFF_MIN=100ms",
		"RETRY_BACKOFF_MAX=1s",
	}, o.extraEnv...)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if out, err := harness.Run(t, ctx, p.env, "migrate"); err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	p.api = harness.Start(t, "api", p.env, "api")
	for i := 0; i < o.handlers; i++ {
		env := append(append([]string{}, p.env...), fmt.Sprintf("CONSUMER_NAME=handler-%d", i+1))
		if o.handlerEnv != nil {
			env = append(env, o.handlerEnv(i)...)
		}
		p.handlers = append(p.handlers, harness.Start(t, fmt.Sprintf("handler-%d", i+1), env, "handler", "--concurrency", "8"))
	}
	p.proj = harness.Start(t, "projector", append(append([]string{}, p.env...), "CONSUMER_NAME=projector-1"), "projector")
	for _, proc := range append([]*harness.Proc{p.api, p.proj}, p.handlers...) {
		proc.WaitReady(t, time.Minute)
	}
	return p
}

// upload posts one document and returns its id. It may run on any
// goroutine: on failure it reports an error and returns "".
func (p *pipeline) upload(name string, data []byte, notify string) string {
	p.t.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, _ := mw.CreateFormFile("file", name)
	_, _ = fw.Write(data)
	if notify != "" {
		_ = mw.WriteField("notify", notify)
	}
	_ = mw.Close()
	resp, err := http.Post(p.api.URL()+"/v1/documents", mw.FormDataContentType(), &body)
	if err != nil {
		p.t.Errorf("upload %s: %v", name, err)
		return ""
	}
	defer resp.Body.Close()
	var out struct {
		DocID  string `json:"doc_id"`
		Status string `json:"status"`
	}
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusAccepted || json.Unmarshal(raw, &out) != nil || out.Status != "processing" {
		p.t.Errorf("upload %s: %d %s", name, resp.StatusCode, raw)
		return ""
	}
	if loc := resp.Header.Get("Location"); loc != "/v1/documents/"+out.DocID {
		p.t.Errorf("Location = %q", loc)
	}
	return out.DocID
}

type docView struct {
	DocID       string     `json:"doc_id"`
	Status      string     `json:"status"`
	Filename    *string    `json:"filename"`
	Size        *int64     `json:"size"`
	ContentType *string    `json:"content_type"`
	SHA256      *string    `json:"sha256"`
	Words       *int64     `json:"words"`
	Lines       *int64     `json:"lines"`
	Summary     *string    `json:"summary"`
	Error       *string    `json:"error"`
	UploadedAt  *time.Time `json:"uploaded_at"`
	ProcessedAt *time.Time `json:"processed_at"`
}

func (p *pipeline) document(id string) (int, docView) {
	p.t.Helper()
	resp, err := http.Get(p.api.URL() + "/v1/documents/" + id)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v docView
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(raw, &v); err != nil {
			p.t.Fatalf("decode %s: %v", raw, err)
		}
	}
	return resp.StatusCode, v
}

// waitFinal polls every document until none is "processing", within a
// generous liveness bound.
func (p *pipeline) waitFinal(ids []string) map[string]docView {
	p.t.Helper()
	out := map[string]docView{}
	deadline := time.Now().Add(3 * time.Minute)
	for len(out) < len(ids) {
		if time.Now().After(deadline) {
			p.t.Fatalf("only %d of %d documents reached a final status", len(out), len(ids))
		}
		for _, id := range ids {
			if _, done := out[id]; done {
				continue
			}
			code, v := p.document(id)
			if code != http.StatusOK {
				p.t.Fatalf("GET document %s: %d (never 404 after the 202)", id, code)
			}
			if v.Status != "processing" {
				out[id] = v
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return out
}

// fixture is one kind of document and what processing must say about it.
type fixture struct {
	name        string
	data        []byte
	status      string
	contentType string
	words       int64
	lines       int64
	errorHas    string
}

var pngBytes = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")

var fixtures = []fixture{
	{name: "notes.txt", data: []byte("Conveyor moves work.\nIt never loses it.\n"), status: "processed", contentType: "text/plain", words: 7, lines: 2},
	{name: "readme.md", data: []byte("# Title\n\nSome *markdown* text here.\n"), status: "processed", contentType: "text/markdown", words: 6, lines: 3},
	{name: "table.csv", data: []byte("name,qty\napple,3\npear,5\n"), status: "processed", contentType: "text/csv", words: 6, lines: 3},
	{name: "data.json", data: []byte(`{"title":"Quarterly report","tags":["finance","q3"],"n":3}`), status: "processed", contentType: "application/json", words: 4, lines: 3},
	{name: "page.html", data: []byte("<html><head><title>Hi</title><style>p{}</style></head><body><p>Hello <b>world</b></p><script>x()</script><p>Bye</p></body></html>"), status: "processed", contentType: "text/html", words: 4, lines: 3},
	{name: "pixel.png", data: pngBytes, status: "failed", contentType: "image/png", errorHas: "unsupported content type"},
	{name: "empty.txt", data: nil, status: "failed", errorHas: "empty"},
	{name: "broken.txt", data: []byte("valid start \xff\xfe\xfd invalid bytes"), status: "failed", errorHas: "UTF-8"},
}

// TestPipelineEndToEnd runs the real binary as separate processes (api, two
// handler replicas, projector) against a real redis-server, PostgreSQL and
// SMTP server, uploads documents of every kind with notifications, and
// checks every outcome.
func TestPipelineEndToEnd(t *testing.T) {
	t.Parallel()
	p := startPipeline(t, pipelineOpts{handlers: 2})

	const n = 56
	ids := make([]string, n)
	kinds := map[string]fixture{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := fixtures[i%len(fixtures)]
			id := p.upload(f.name, f.data, fmt.Sprintf("user%d@example.com", i))
			mu.Lock()
			ids[i], kinds[id] = id, f
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	final := p.waitFinal(ids)
	for id, v := range final {
		f := kinds[id]
		sum := sha256.Sum256(f.data)
		if v.Status != f.status || v.Filename == nil || *v.Filename != f.name || v.Size == nil || *v.Size != int64(len(f.data)) ||
			v.SHA256 == nil || *v.SHA256 != hex.EncodeToString(sum[:]) || v.UploadedAt == nil || v.ProcessedAt == nil {
			t.Errorf("%s (%s): %+v", f.name, id, v)
			continue
		}
		switch f.status {
		case "processed":
			if v.ContentType == nil || *v.ContentType != f.contentType || v.Words == nil || *v.Words != f.words ||
				v.Lines == nil || *v.Lines != f.lines || v.Summary == nil || *v.Summary == "" || v.Error != nil {
				t.Errorf("%s: content_type=%v words=%v lines=%v summary=%v error=%v", f.name, deref(v.ContentType), deref(v.Words), deref(v.Lines), deref(v.Summary), deref(v.Error))
			}
		case "failed":
			if v.Error == nil || !strings.Contains(*v.Error, f.errorHas) || (f.contentType != "" && (v.ContentType == nil || *v.ContentType != f.contentType)) {
				t.Errorf("%s: error=%v content_type=%v", f.name, deref(v.Error), deref(v.ContentType))
			}
		}
	}

	// Every notification delivered once to the real SMTP server.
	var msgs []testenv.MailpitMessage
	deadline := time.Now().Add(2 * time.Minute)
	for {
		msgs = p.mail.Messages(t)
		if len(msgs) >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	perRecipient := map[string]int{}
	for _, m := range msgs {
		for _, to := range m.To {
			perRecipient[to]++
		}
	}
	for i := 0; i < n; i++ {
		if c := perRecipient[fmt.Sprintf("user%d@example.com", i)]; c != 1 {
			t.Errorf("user%d@example.com got %d emails, want 1", i, c)
		}
	}
	if len(msgs) != n {
		t.Errorf("mailpit has %d messages, want %d", len(msgs), n)
	}

	// Work was shared by both handler replicas.
	for _, h := range p.handlers {
		acked := h.Metric(t, `conveyor_messages_finished_total{consumer_group="document-processor",outcome="acked"}`)
		if acked == 0 {
			t.Errorf("%s processed no documents: work was not shared", h.Name)
		}
		t.Logf("%s acked %.0f documents", h.Name, acked)
	}
	// Nothing left pending, nothing dead-lettered.
	p.assertDrained(t)
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// assertDrained checks that every group acknowledged everything and nothing
// was dead-lettered.
func (p *pipeline) assertDrained(t *testing.T) {
	t.Helper()
	ctx := t.Context()
	deadline := time.Now().Add(time.Minute)
	for {
		pending := int64(0)
		for _, s := range []string{"document.uploaded", "document.processed", "document.processing_failed", "email.requested", "email.sent", "email.failed"} {
			groups, err := p.rdb.XInfoGroups(ctx, s).Result()
			if err != nil {
				t.Fatalf("xinfo groups %s: %v", s, err)
			}
			for _, g := range groups {
				pending += g.Pending + g.Lag
			}
		}
		if pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d entries still pending or unread", pending)
		}
		time.Sleep(100 * time.Millisecond)
	}
	keys, _ := p.rdb.Keys(ctx, "conveyor:dlq:*").Result()
	for _, k := range keys {
		if n, _ := p.rdb.XLen(ctx, k).Result(); n > 0 {
			t.Errorf("%s holds %d dead letters", k, n)
		}
	}
}

// A garbage entry written straight into a stream with redis-cli neither
// crashes nor stalls a consumer: it is dead-lettered and the work behind it
// is done.
func TestGarbageStreamEntryIsDeadLetteredWithoutStalling(t *testing.T) {
	t.Parallel()
	p := startPipeline(t, pipelineOpts{handlers: 1})
	for _, args := range [][]string{
		{"XADD", "document.uploaded", "*", "garbage", "yes"},
		{"XADD", "document.uploaded", "*", "_watermill_message_uuid", "x", "payload", "{not json", "metadata", ""},
		{"XADD", "email.requested", "*", "_watermill_message_uuid", "y", "metadata", "\x01\x02"},
	} {
		cmd := exec.Command("redis-cli", append([]string{"-p", strings.Split(p.redis.Addr(), ":")[1]}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("redis-cli %v: %v\n%s", args, err, out)
		}
	}
	id := p.upload("after.txt", []byte("Uploaded after the garbage."), "after@example.com")
	final := p.waitFinal([]string{id})
	if final[id].Status != "processed" {
		t.Fatalf("document after garbage: %+v", final[id])
	}
	for _, proc := range append([]*harness.Proc{p.api, p.proj}, p.handlers...) {
		if proc.Exited() {
			t.Fatalf("%s exited: %v", proc.Name, proc.ExitErr())
		}
	}
	ctx := t.Context()
	// Both consumer groups of document.uploaded dead-letter its two
	// garbage entries; the email sender and projector dead-letter the one
	// on email.requested.
	want := map[string]int64{"conveyor:dlq:document-processor": 2, "conveyor:dlq:email-sender": 1, "conveyor:dlq:projector": 3}
	deadline := time.Now().Add(time.Minute)
	for k, n := range want {
		for {
			got, _ := p.rdb.XLen(ctx, k).Result()
			if got == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s holds %d dead letters, want %d", k, got, n)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	out, err := harness.Run(t, ctx, p.env, "dlq", "list")
	if err != nil || !strings.Contains(out, "(undecodable)") {
		t.Fatalf("dlq list: %v\n%s", err, out)
	}
}

// SIGTERM to a handler in the middle of its work: it finishes or hands back
// its messages, acks what finished, and exits 0; nothing is lost and
// nothing is processed twice.
func TestHandlerGracefulShutdownMidBatch(t *testing.T) {
	t.Parallel()
	// A slow summarizer keeps the handlers busy: each summary takes 300ms.
	slow := newSlowLLM(t, 300*time.Millisecond)
	p := startPipeline(t, pipelineOpts{
		handlers: 2,
		extraEnv: []string{"SUMMARIZER_URL=" + slow, "SUMMARIZER_MODEL=slow"},
	})
	const n = 40
	ids := make([]string, n)
	for i := range ids {
		ids[i] = p.upload(fmt.Sprintf("doc-%d.txt", i), []byte(fmt.Sprintf("Document number %d. It has two sentences.", i)), "")
	}
	// Stop handler-1 while it holds messages.
	deadline := time.Now().Add(time.Minute)
	for p.handlers[0].Metric(t, `conveyor_messages_delivered_total{consumer_group="document-processor"}`) < 4 {
		if time.Now().After(deadline) {
			t.Fatal("handler-1 never got work")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := p.handlers[0].Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !p.handlers[0].Wait(time.Minute) {
		t.Fatal("handler-1 did not stop after SIGTERM")
	}
	if err := p.handlers[0].ExitErr(); err != nil {
		t.Fatalf("handler-1 exit: %v\n%s", err, p.handlers[0].Log())
	}
	final := p.waitFinal(ids)
	for id, v := range final {
		if v.Status != "processed" {
			t.Errorf("%s: %+v", id, v)
		}
	}
	p.assertDrained(t)
	// Processed once each: one document.processed entry per document.
	xs, err := p.rdb.XRange(t.Context(), "document.processed", "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != n {
		t.Fatalf("%d document.processed entries for %d documents: some were processed twice or lost", len(xs), n)
	}
}

// newSlowLLM serves an OpenAI-compatible chat completions endpoint that
// takes delay per request; it stands in for a remote model.
func newSlowLLM(t *testing.T, delay time.Duration) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/chat/completions" {
			http.NotFound(w, r)
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(delay)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"A short summary."}}]}`)
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/v1"
}
