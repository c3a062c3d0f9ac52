package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

// TestMain stops the shared redis-server and PostgreSQL after the tests.
func TestMain(m *testing.M) { testenv.Main(m) }

// discard is the logger of the API and its parts: the tests look at what
// the API answered, stored and published, not at what it logged.
var discard = slog.New(slog.DiscardHandler)

// Limits of the API under test, small so that a test can cross them with a
// few bytes.
const (
	maxUpload = 1 << 10
	maxBatch  = 10
)

// liveness bounds waits for something that happens within milliseconds on
// an idle machine; it is only there so that a broken test ends.
const liveness = 30 * time.Second

// env is one test's API, wired as cmd/conveyor wires it, on real parts: a
// Publisher, idempotency records and a cache on the shared Redis (under a
// prefix of the test's own), a migrated PostgreSQL database of its own and a
// blob directory of its own. The API is served over HTTP.
type env struct {
	srv     *httptest.Server
	rdb     *redis.Client
	prefix  string
	blobDir string
	store   *store.Store
	cache   *cache.Client
	idem    *idem.Store
	// publisher is the API's Publisher.
	publisher *bus.Publisher
}

// envConfig holds what a test changes in its env.
type envConfig struct {
	// pubClient is the Redis of the Publisher; nil means the test's Redis.
	pubClient redis.UniversalClient
	// idemClient is the Redis of the idempotency records; nil means the
	// test's Redis.
	idemClient redis.UniversalClient
	// checks returns the readiness checks; nil means those of production
	// (the Redis and the database).
	checks func(e *env) map[string]api.Check
	// wrapBlobs, if set, wraps the API's blob storage.
	wrapBlobs func(blob.Store) blob.Store
	// idemLease is the API's IdempotencyLease; 0 means its default.
	idemLease time.Duration
	// maxUploads and uploadWait are the API's MaxConcurrentUploads and
	// UploadWait; 0 means their defaults.
	maxUploads int
	uploadWait time.Duration
	// jsonBodyTimeout is the API's JSONBodyTimeout; 0 means its default.
	jsonBodyTimeout time.Duration
	// wrapPub, if set, wraps the API's Publisher (to make a call fail).
	wrapPub func(api.Publisher) api.Publisher
	// sharing, if set, is an env whose Redis prefix, database and blob
	// directory this one uses: a second API replica of the same system.
	sharing *env
}

type envOption func(*envConfig)

// withPublisherRedis makes the Publisher write to c instead of the test's
// Redis, so that publishing can fail while everything else works.
func withPublisherRedis(c redis.UniversalClient) envOption {
	return func(cfg *envConfig) { cfg.pubClient = c }
}

// withIdemRedis makes the idempotency records live on c (the test's Redis
// seen through a failing client, say).
func withIdemRedis(c redis.UniversalClient) envOption {
	return func(cfg *envConfig) { cfg.idemClient = c }
}

// withSharedState makes the env a second replica of other: same records,
// streams, database and stored bytes, its own Publisher.
func withSharedState(other *env) envOption {
	return func(cfg *envConfig) { cfg.sharing = other }
}

// withIdempotencyLease sets the API's IdempotencyLease.
func withIdempotencyLease(d time.Duration) envOption {
	return func(cfg *envConfig) { cfg.idemLease = d }
}

// withUploadLimit sets the API's MaxConcurrentUploads and UploadWait.
func withUploadLimit(n int, wait time.Duration) envOption {
	return func(cfg *envConfig) { cfg.maxUploads, cfg.uploadWait = n, wait }
}

// withJSONBodyTimeout sets the API's JSONBodyTimeout.
func withJSONBodyTimeout(d time.Duration) envOption {
	return func(cfg *envConfig) { cfg.jsonBodyTimeout = d }
}

// withPublisher wraps the API's Publisher (to make a call fail, say).
func withPublisher(wrap func(api.Publisher) api.Publisher) envOption {
	return func(cfg *envConfig) { cfg.wrapPub = wrap }
}

// withBlobs wraps the API's blob storage (to make it fail, say).
func withBlobs(wrap func(blob.Store) blob.Store) envOption {
	return func(cfg *envConfig) { cfg.wrapBlobs = wrap }
}

// withChecks sets the readiness checks, made once the env has its parts.
func withChecks(checks func(e *env) map[string]api.Check) envOption {
	return func(cfg *envConfig) { cfg.checks = checks }
}

func newEnv(t testing.TB, opts ...envOption) *env {
	t.Helper()
	var cfg envConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	e := &env{rdb: testenv.Redis(t), prefix: testenv.Prefix(t), blobDir: t.TempDir()}
	if cfg.sharing != nil {
		e.prefix, e.blobDir, e.store = cfg.sharing.prefix, cfg.sharing.blobDir, cfg.sharing.store
	}
	if cfg.pubClient == nil {
		cfg.pubClient = e.rdb
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: cfg.pubClient, StreamPrefix: e.prefix, Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	e.publisher = pub
	if cfg.idemClient == nil {
		cfg.idemClient = e.rdb
	}
	if e.idem, err = idem.New(idem.Config{Redis: cfg.idemClient, Prefix: e.prefix + "idem:"}); err != nil {
		t.Fatal(err)
	}
	if e.cache, err = cache.New(cache.Config{Redis: e.rdb, Prefix: e.prefix + "cache:", Logger: discard}); err != nil {
		t.Fatal(err)
	}
	if e.store == nil {
		if e.store, err = store.Open(store.Config{URL: testenv.DatabaseURL(t), MaxOpenConns: 4}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.store.Close() })
		if _, err := e.store.Migrate(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	var blobs blob.Store
	if blobs, err = blob.NewDir(blob.DirConfig{Dir: e.blobDir}); err != nil {
		t.Fatal(err)
	}
	if cfg.wrapBlobs != nil {
		blobs = cfg.wrapBlobs(blobs)
	}
	checks := map[string]api.Check{
		"redis":    func(ctx context.Context) error { return e.rdb.Ping(ctx).Err() },
		"postgres": api.Soft(e.store.Ping), // as the api role's (cmd/conveyor)
	}
	if cfg.checks != nil {
		checks = cfg.checks(e)
	}
	var apiPub api.Publisher = pub
	if cfg.wrapPub != nil {
		apiPub = cfg.wrapPub(pub)
	}
	a, err := api.New(api.Config{
		Publisher:            apiPub,
		Blobs:                blobs,
		Reader:               e.store,
		Cache:                e.cache,
		Idem:                 e.idem,
		IdempotencyLease:     cfg.idemLease,
		MaxUploadBytes:       maxUpload,
		MaxBatch:             maxBatch,
		MaxConcurrentUploads: cfg.maxUploads,
		UploadWait:           cfg.uploadWait,
		JSONBodyTimeout:      cfg.jsonBodyTimeout,
		Checks:               checks,
		Registry:             prometheus.NewRegistry(),
		Logger:               discard,
	})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(a.Handler())
	t.Cleanup(e.srv.Close)
	return e
}

// closedRedis returns a client of the test's Redis that is already closed:
// every command fails at once, as after a shutdown.
func closedRedis(t testing.TB) redis.UniversalClient {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	return c
}

// deadRedis returns a client of a port where nothing listens: every command
// fails to connect, as when Redis is down. Port 1 (tcpmux) is privileged
// and unused, so its connections are refused at once; a port taken from a
// listener and closed again may meanwhile be another test's.
func deadRedis(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 2 * time.Second})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// response is an HTTP response read whole.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) String() string { return http.StatusText(r.status) + " " + string(r.body) }

// do sends req to the API and reads the whole response.
func (e *env) do(t testing.TB, req *http.Request) response {
	t.Helper()
	r, err := e.send(req)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// send is do for a goroutine other than the test's.
func (e *env) send(req *http.Request) (response, error) {
	res, err := e.srv.Client().Do(req)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", req.Method, req.URL.Path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: read body: %w", req.Method, req.URL.Path, err)
	}
	return response{status: res.StatusCode, header: res.Header, body: body}, nil
}

// request builds a request to path on the API; header holds pairs of
// names and values.
func (e *env) request(t testing.TB, method, path string, body io.Reader, header ...string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, e.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

func (e *env) get(t testing.TB, path string) response {
	t.Helper()
	return e.do(t, e.request(t, http.MethodGet, path, nil))
}

// postJSON posts body with Content-Type application/json (and header).
func (e *env) postJSON(t testing.TB, path, body string, header ...string) response {
	t.Helper()
	return e.do(t, e.request(t, http.MethodPost, path, strings.NewReader(body),
		append([]string{"Content-Type", "application/json"}, header...)...))
}

// part is one part of a multipart upload.
type part struct {
	name        string
	filename    string // set for a file part
	contentType string
	content     []byte
	// disposition, if set, is the Content-Disposition header as it is.
	disposition string
}

func filePart(filename string, content []byte) part {
	return part{name: "file", filename: filename, contentType: "text/plain", content: content}
}

func fieldPart(name, value string) part { return part{name: name, content: []byte(value)} }

// multipartBody encodes parts; it returns the body and its Content-Type.
func multipartBody(t testing.TB, parts ...part) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		switch {
		case p.disposition != "":
			h.Set("Content-Disposition", p.disposition)
		case p.filename != "":
			h.Set("Content-Disposition", `form-data; name="`+p.name+`"; filename="`+escapeQuotes(p.filename)+`"`)
		default:
			h.Set("Content-Disposition", `form-data; name="`+p.name+`"`)
		}
		if p.contentType != "" {
			h.Set("Content-Type", p.contentType)
		}
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(p.content); err != nil {
			t.Fatal(err)
		}
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), mw.FormDataContentType()
}

// escapeQuotes escapes a filename as mime/multipart's CreateFormFile does.
func escapeQuotes(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s)
}

// upload posts parts to /v1/documents (and header).
func (e *env) upload(t testing.TB, parts []part, header ...string) response {
	t.Helper()
	body, ct := multipartBody(t, parts...)
	return e.do(t, e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body),
		append([]string{"Content-Type", ct}, header...)...))
}

// streamed hides the length of a body, so that the client sends it chunked
// and the API can only learn its size by reading it.
type streamed struct{ io.Reader }

// entry is one published event as it lies in its stream.
type entry struct {
	ID      string            // the event id (the Watermill message UUID)
	Meta    map[string]string // the envelope
	Payload []byte
}

// entries reads the test's stream of eventType with XRANGE.
func (e *env) entries(t testing.TB, eventType string) []entry {
	t.Helper()
	xs, err := e.rdb.XRange(t.Context(), e.prefix+eventType, "-", "+").Result()
	if err != nil {
		t.Fatalf("XRANGE %s: %v", eventType, err)
	}
	out := make([]entry, 0, len(xs))
	for _, x := range xs {
		en := entry{Meta: map[string]string{}}
		en.ID, _ = x.Values["_watermill_message_uuid"].(string)
		if md, _ := x.Values["metadata"].(string); md != "" {
			if err := msgpack.Unmarshal([]byte(md), &en.Meta); err != nil {
				t.Fatalf("%s entry %s: metadata: %v", eventType, x.ID, err)
			}
		}
		p, _ := x.Values["payload"].(string)
		en.Payload = []byte(p)
		out = append(out, en)
	}
	return out
}

// noEntries fails the test if any of the streams of types holds an entry.
func (e *env) noEntries(t testing.TB, types ...string) {
	t.Helper()
	for _, typ := range types {
		if es := e.entries(t, typ); len(es) != 0 {
			t.Errorf("stream %s holds %d entries, want none: first payload %s", typ, len(es), es[0].Payload)
		}
	}
}

// keys returns the test's Redis keys that match pattern (after the prefix).
// refuseAppends makes Redis refuse appends to the stream of eventType
// (its key holds a string, so XADD answers WRONGTYPE) and returns the
// stream's key; deleting that key heals it.
func (e *env) refuseAppends(t testing.TB, eventType string) string {
	t.Helper()
	stream := e.prefix + eventType
	if err := e.rdb.Set(t.Context(), stream, "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	return stream
}

func (e *env) keys(t testing.TB, pattern string) []string {
	t.Helper()
	var out []string
	iter := e.rdb.Scan(t.Context(), 0, e.prefix+pattern, 100).Iterator()
	for iter.Next(t.Context()) {
		out = append(out, strings.TrimPrefix(iter.Val(), e.prefix))
	}
	if err := iter.Err(); err != nil {
		t.Fatalf("SCAN %s: %v", pattern, err)
	}
	return out
}

// blobFiles lists every file under the blob directory (stored bytes and
// temp files), relative to it.
func (e *env) blobFiles(t testing.TB) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(e.blobDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(e.blobDir, path)
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// blobPath is where the blob directory keeps the bytes of sha.
func blobPath(sha string) string { return filepath.Join(sha[0:2], sha[2:4], sha) }

// readBlob returns the stored bytes of sha.
func (e *env) readBlob(t testing.TB, sha string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.blobDir, blobPath(sha)))
	if err != nil {
		t.Fatalf("stored bytes of %s: %v", sha, err)
	}
	return b
}

// decodeJSON decodes a response body into a new T.
func decodeJSON[T any](t testing.TB, r response) T {
	t.Helper()
	var v T
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("decode %T from %s: %v", v, r.body, err)
	}
	return v
}

// wantStatus fails the test at once unless r has status.
func wantStatus(t testing.TB, r response, status int) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
}

// fieldError is one entry of error.fields.
type fieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// apiError is the detail of an error response.
type apiError struct {
	Code    string
	Message string
	Fields  []fieldError
}

// fieldNames lists the fields an error names.
func (e apiError) fieldNames() []string {
	var out []string
	for _, f := range e.Fields {
		out = append(out, f.Field)
	}
	return out
}

func (e apiError) names(field string) bool {
	for _, f := range e.Fields {
		if f.Field == field {
			return true
		}
	}
	return false
}

// checkErrorShape reports whether body is exactly
// {"error":{"code":string,"message":string[,"fields":[...]]}} with a
// non-empty code and message, and decodes it.
func checkErrorShape(body []byte) (apiError, string) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		return apiError{}, "not a JSON object: " + err.Error()
	}
	raw, ok := top["error"]
	if !ok || len(top) != 1 {
		return apiError{}, "want exactly one member, error"
	}
	var detail map[string]json.RawMessage
	if err := json.Unmarshal(raw, &detail); err != nil {
		return apiError{}, "error is not an object"
	}
	var out apiError
	for name, v := range detail {
		var err error
		switch name {
		case "code":
			err = json.Unmarshal(v, &out.Code)
		case "message":
			err = json.Unmarshal(v, &out.Message)
		case "fields":
			err = json.Unmarshal(v, &out.Fields)
		default:
			return apiError{}, "unexpected member error." + name
		}
		if err != nil {
			return apiError{}, "error." + name + ": " + err.Error()
		}
	}
	if out.Code == "" || out.Message == "" {
		return apiError{}, "error.code and error.message must be non-empty strings"
	}
	return out, ""
}

// wantError checks that r is an error response with status and code, in
// the one error shape, and returns its detail.
func wantError(t testing.TB, r response, status int, code string) apiError {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	detail, problem := checkErrorShape(r.body)
	if problem != "" {
		t.Fatalf("error body %s: %s", r.body, problem)
	}
	if detail.Code != code {
		t.Errorf("error.code = %q, want %q (message %q)", detail.Code, code, detail.Message)
	}
	return detail
}

// rerunFirst is a go-redis hook that runs the first command that match
// accepts, and that Redis answered without an error, a second time, as the
// client does when a connection breaks after Redis ran a command and before
// its reply arrived: the caller sees the second run's reply.
type rerunFirst struct {
	match func(redis.Cmder) bool
	done  atomic.Bool
}

func (h *rerunFirst) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *rerunFirst) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if err := next(ctx, cmd); err != nil || !h.match(cmd) || !h.done.CompareAndSwap(false, true) {
			return err
		}
		return next(ctx, cmd)
	}
}

func (h *rerunFirst) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// ran reports whether the hook ran a command twice.
func (h *rerunFirst) ran() bool { return h.done.Load() }

// hookedRedis returns a client of the test's Redis with hook added.
func hookedRedis(t testing.TB, hook redis.Hook) *redis.Client {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	c.AddHook(hook)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// cmdArgs returns cmd's arguments as strings, the command's name in lower
// case first.
func cmdArgs(cmd redis.Cmder) []string {
	out := make([]string, len(cmd.Args()))
	for i, a := range cmd.Args() {
		out[i] = fmt.Sprint(a)
	}
	if len(out) > 0 {
		out[0] = strings.ToLower(out[0])
	}
	return out
}
