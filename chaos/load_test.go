package chaos

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// request is one piece of work the generator asks the API for. It is
// built once from the seed and sent as is on every retry.
type request struct {
	item  int
	kind  kind
	path  string
	body  []byte
	ctype string
	// key is the Idempotency-Key of an upload or email.
	key string
	// eventID and emailID are the client's ids of an upstream event.
	eventID, emailID string
	// filename, notify and want describe a document (see entry).
	filename, notify, want string
	// repeat sends the request once more after it was accepted, on
	// purpose: the answer must name the same id.
	repeat bool
}

// docFixture is one kind of document and the final status its content
// must reach.
type docFixture struct {
	name   string
	status string
	data   func(item int, r *rand.Rand) []byte
}

var pngBytes = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")

// docFixtures mixes valid text, Markdown, CSV, JSON and HTML with an
// unsupported type, an empty file and broken UTF-8.
var docFixtures = []docFixture{
	{"notes.txt", "processed", func(i int, r *rand.Rand) []byte {
		return fmt.Appendf(nil, "Conveyor moves work number %d.\nIt never loses it, says line %d.\n", i, r.IntN(1000))
	}},
	{"readme.md", "processed", func(i int, r *rand.Rand) []byte {
		return fmt.Appendf(nil, "# Title %d\n\nSome *markdown* text, version %d.\n", i, r.IntN(1000))
	}},
	{"table.csv", "processed", func(i int, r *rand.Rand) []byte {
		return fmt.Appendf(nil, "name,qty\napple,%d\npear,%d\nplum,%d\n", i, r.IntN(100), r.IntN(100))
	}},
	{"data.json", "processed", func(i int, r *rand.Rand) []byte {
		return fmt.Appendf(nil, `{"title":"Report %d","tags":["finance","q%d"],"n":%d}`, i, 1+r.IntN(4), r.IntN(1000))
	}},
	{"page.html", "processed", func(i int, r *rand.Rand) []byte {
		return fmt.Appendf(nil, "<html><head><title>Page %d</title></head><body><p>Hello <b>world</b> %d</p></body></html>", i, r.IntN(1000))
	}},
	{"pixel.png", "failed", func(int, *rand.Rand) []byte { return pngBytes }},
	{"empty.txt", "failed", func(int, *rand.Rand) []byte { return nil }},
	{"broken.txt", "failed", func(i int, _ *rand.Rand) []byte {
		return fmt.Appendf(nil, "valid start \xff\xfe\xfd invalid bytes %d", i)
	}},
}

// loadMix is the share, in percent, of each kind of request, of documents
// asking for a notification, and of requests repeated on purpose.
type loadMix struct {
	documents, emails int // the rest are upstream events
	notify, repeat    int
}

var defaultMix = loadMix{documents: 40, emails: 30, notify: 25, repeat: 5}

// buildRequest draws request item from r. Everything that names the
// request (file name, subject, ids) carries the item number, so every row
// in the read models can be traced to the one request that made it.
func buildRequest(seed uint64, item int, mix loadMix, r *rand.Rand) request {
	req := request{item: item, repeat: r.IntN(100) < mix.repeat}
	switch n := r.IntN(100); {
	case n < mix.documents:
		f := docFixtures[r.IntN(len(docFixtures))]
		req.kind, req.path, req.want = kindDocument, "/v1/documents", f.status
		req.filename = fmt.Sprintf("d%06d-%s", item, f.name)
		if r.IntN(100) < mix.notify {
			req.notify = fmt.Sprintf("doc%d@example.com", item)
		}
		req.body, req.ctype = multipartBody(req.filename, f.data(item, r), req.notify)
		req.key = fmt.Sprintf("chaos-%d-%d", seed, item)
	case n < mix.documents+mix.emails:
		req.kind, req.path, req.ctype = kindEmail, "/v1/emails", "application/json"
		req.key = fmt.Sprintf("chaos-%d-%d", seed, item)
		req.body, _ = json.Marshal(map[string]string{
			"to":      fmt.Sprintf("mail%d@example.com", item),
			"subject": fmt.Sprintf("chaos %d email %d", seed, item),
			"body":    fmt.Sprintf("Email %d of a chaos run.", item),
		})
	default:
		req.kind, req.path, req.ctype = kindEvent, "/v1/events", "application/json"
		req.eventID, req.emailID = seededUUID(r), seededUUID(r)
		req.body, _ = json.Marshal(map[string]any{
			"type": "email.requested",
			"id":   req.eventID,
			"data": map[string]string{
				"email_id":     req.emailID,
				"to":           fmt.Sprintf("event%d@example.com", item),
				"subject":      fmt.Sprintf("chaos %d event %d", seed, item),
				"body":         fmt.Sprintf("Upstream event %d of a chaos run.", item),
				"requested_at": time.Now().UTC().Format(time.RFC3339Nano),
			},
		})
	}
	return req
}

func multipartBody(filename string, data []byte, notify string) ([]byte, string) {
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	fw, _ := mw.CreateFormFile("file", filename) // writes to a buffer: cannot fail
	_, _ = fw.Write(data)
	if notify != "" {
		_ = mw.WriteField("notify", notify)
	}
	_ = mw.Close()
	return b.Bytes(), mw.FormDataContentType()
}

// seededUUID draws a random (version 4) UUID from r, so that a replayed
// seed sends the same ids.
func seededUUID(r *rand.Rand) string {
	var u uuid.UUID
	binary.LittleEndian.PutUint64(u[:8], r.Uint64())
	binary.LittleEndian.PutUint64(u[8:], r.Uint64())
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u.String()
}

// generator sends requests to the API at a bounded rate with bounded
// concurrency, retries what failed, and enters what was accepted in the
// ledger.
type generator struct {
	api    string
	client *http.Client
	ledger *ledger
	seed   uint64
	mix    loadMix
	m      mode
	// r draws the requests, in item order, on the dispatching goroutine
	// only.
	r *rand.Rand

	sent, retried, rotated, repeated, repeatsUnsettled atomic.Int64
}

func newGenerator(api string, l *ledger, seed uint64, mix loadMix, m mode) *generator {
	return &generator{
		api: api,
		client: &http.Client{
			Timeout:   30 * time.Second,
			Transport: &http.Transport{MaxIdleConnsPerHost: m.inFlight, IdleConnTimeout: 30 * time.Second},
		},
		ledger: l,
		seed:   seed,
		mix:    mix,
		m:      m,
		r:      rand.New(rand.NewPCG(seed, 2)),
	}
}

// close drops the generator's idle connections.
func (g *generator) close() { g.client.CloseIdleConnections() }

// run sends requests from up to (not including) to, one every interval
// (later if the concurrency bound is reached), and returns when each was
// accepted or given up, or when ctx ends (what is still pending is then
// given up).
func (g *generator) run(ctx context.Context, from, to int, interval time.Duration) {
	sem := make(chan struct{}, g.m.inFlight)
	var wg sync.WaitGroup
	start := time.Now()
	for i := from; i < to; i++ {
		req := buildRequest(g.seed, i, g.mix, g.r)
		retryRand := rand.New(rand.NewPCG(g.seed, uint64(i)+1000))
		if !sleepUntil(ctx, start.Add(time.Duration(i-from)*interval)) {
			g.ledger.abandon(req.kind)
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			g.ledger.abandon(req.kind)
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			g.submit(ctx, req, retryRand)
		})
	}
	wg.Wait()
}

// answer is what the API said to one attempt.
type answer struct {
	status    int
	id        string
	duplicate bool // an event id seen before
	replayed  bool // Idempotent-Replayed: true
	body      string
}

// submit sends req until the API accepts it: a 503, a connection error or
// a 409 (the key is still claimed by an earlier attempt) is retried with
// the same Idempotency-Key or event id. A key answered 409 for longer than
// rotateKeyAfter after a definite 503 was left claimed by a failed attempt
// (the API could not release it while Redis was down): the request is
// then sent under a new key, which is what a client told "not accepted"
// may do. Any other answer is a problem of the run.
func (g *generator) submit(ctx context.Context, req request, r *rand.Rand) {
	g.sent.Add(1)
	start := time.Now()
	key := req.key
	var conflictSince time.Time
	last503 := false
	wait := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		a, err := g.post(ctx, req, key)
		switch {
		case err != nil:
			last503 = false
		case a.status == http.StatusAccepted:
			now := time.Now()
			if g.ledger.accept(req, a.id, now) == nil && req.repeat {
				g.repeat(ctx, req, key, a.id)
			}
			return
		case a.status == http.StatusConflict && key != "":
			if conflictSince.IsZero() {
				conflictSince = time.Now()
			}
			if last503 && time.Since(conflictSince) > g.m.rotateKeyAfter {
				key = fmt.Sprintf("%s-r%d", req.key, attempt)
				conflictSince, last503 = time.Time{}, false
				g.rotated.Add(1)
			}
		case a.status == http.StatusServiceUnavailable:
			last503, conflictSince = true, time.Time{}
		default:
			g.ledger.problem("%s request %d refused: %d %s", req.kind, req.item, a.status, a.body)
			g.ledger.abandon(req.kind)
			return
		}
		if time.Since(start) > g.m.giveUp || !sleepCtx(ctx, jitter(r, wait)) {
			g.ledger.abandon(req.kind)
			return
		}
		g.retried.Add(1)
		wait = min(wait*2, 2*time.Second)
	}
}

// repeat sends an accepted request again with the same key or event id:
// the answer must be 202 with the same id, marked as a replay.
func (g *generator) repeat(ctx context.Context, req request, key, id string) {
	g.repeated.Add(1)
	deadline := time.Now().Add(min(g.m.giveUp, 30*time.Second))
	for wait := 100 * time.Millisecond; ; wait = min(wait*2, 2*time.Second) {
		a, err := g.post(ctx, req, key)
		if err == nil && a.status == http.StatusAccepted {
			if err := g.ledger.accept(req, a.id, time.Now()); err != nil {
				return // recorded as a problem
			}
			if req.kind == kindEvent && !a.duplicate || req.kind != kindEvent && !a.replayed {
				g.ledger.problem("%s request %d repeated: 202 with the same id but not marked as a repeat", req.kind, req.item)
			}
			return
		}
		if err == nil && a.status != http.StatusServiceUnavailable && a.status != http.StatusConflict {
			g.ledger.problem("%s request %d repeated after its 202: %d %s", req.kind, req.item, a.status, a.body)
			return
		}
		// The first answer's record may be unwritable while Redis is down;
		// the repeat proves nothing then.
		if time.Now().After(deadline) || !sleepCtx(ctx, wait) {
			g.repeatsUnsettled.Add(1)
			return
		}
	}
}

func (g *generator) post(ctx context.Context, req request, key string) (answer, error) {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, g.api+req.path, bytes.NewReader(req.body))
	if err != nil {
		return answer{}, err
	}
	hreq.Header.Set("Content-Type", req.ctype)
	if key != "" {
		hreq.Header.Set("Idempotency-Key", key)
	}
	resp, err := g.client.Do(hreq)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return answer{}, err
	}
	a := answer{status: resp.StatusCode, body: strings.TrimSpace(string(raw)), replayed: resp.Header.Get("Idempotent-Replayed") == "true"}
	if a.status != http.StatusAccepted {
		return a, nil
	}
	var out struct {
		DocID     string `json:"doc_id"`
		EmailID   string `json:"email_id"`
		EventID   string `json:"event_id"`
		Duplicate bool   `json:"duplicate"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return answer{}, fmt.Errorf("decode 202 %s: %w", raw, err)
	}
	a.id, a.duplicate = out.DocID+out.EmailID+out.EventID, out.Duplicate
	if a.id == "" {
		return answer{}, errors.New("202 without an id: " + a.body)
	}
	return a, nil
}

// jitter returns d ± 25%.
func jitter(r *rand.Rand, d time.Duration) time.Duration {
	return d*3/4 + time.Duration(r.Int64N(int64(d)/2+1))
}

// sleepCtx sleeps d; it reports false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// sleepUntil sleeps until at; it reports false if ctx ended first.
func sleepUntil(ctx context.Context, at time.Time) bool {
	if d := time.Until(at); d > 0 {
		return sleepCtx(ctx, d)
	}
	return ctx.Err() == nil
}
