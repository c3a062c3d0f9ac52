package api_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

func sha256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// documentFields are the members of every document read.
var documentFields = []string{"doc_id", "status", "filename", "size", "content_type", "sha256",
	"words", "lines", "summary", "error", "uploaded_at", "processed_at"}

// document is a document read; pointers are null members.
type document struct {
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

// readDocument GETs a document, checks it has every member and decodes it.
func (e *env) readDocument(t testing.TB, id string) document {
	t.Helper()
	r := e.get(t, "/v1/documents/"+id)
	wantStatus(t, r, http.StatusOK)
	var members map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &members); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
	for _, name := range documentFields {
		if _, ok := members[name]; !ok {
			t.Errorf("document has no member %q: %s", name, r.body)
		}
	}
	return decodeJSON[document](t, r)
}

// accepted checks a 202 answer to an upload and returns the doc_id.
func wantAcceptedDocument(t testing.TB, r response) string {
	t.Helper()
	wantStatus(t, r, http.StatusAccepted)
	body := decodeJSON[map[string]any](t, r)
	id, _ := body["doc_id"].(string)
	if !events.IsUUID(id) || body["status"] != "processing" || len(body) != 2 {
		t.Fatalf(`body %s, want {"doc_id":<uuid>,"status":"processing"}`, r.body)
	}
	if loc := r.header.Get("Location"); loc != "/v1/documents/"+id {
		t.Errorf("Location = %q, want /v1/documents/%s", loc, id)
	}
	return id
}

func TestPostDocument_accepted(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name         string
		filename     string
		disposition  string
		content      []byte
		contentType  string
		notify       string
		wantFilename string
		wantDeclared string
		wantNotify   string
	}{
		{name: "plain text", filename: "report.txt", content: []byte("hello\nworld\n"), contentType: "text/plain; charset=utf-8",
			wantFilename: "report.txt", wantDeclared: "text/plain"},
		{name: "unix path is cut to its base name", filename: "../../etc/passwd", content: []byte("root:x:0:0"),
			wantFilename: "passwd"},
		{name: "windows path is cut to its base name", filename: `C:\x\y.txt`, content: []byte("y"),
			wantFilename: "y.txt"},
		{name: "tab is removed", filename: "a\tb.txt", content: []byte("ab"), wantFilename: "ab.txt"},
		{name: "encoded control characters are removed", content: []byte("abc"),
			disposition: `form-data; name="file"; filename*=UTF-8''..%2F..%2Fa%01b%7Fc%0A%0Dd%00.txt`, wantFilename: "abcd.txt"},
		{name: "long name is cut to 255 bytes on a rune boundary", filename: strings.Repeat("é", 200) + ".txt", content: []byte("long"),
			wantFilename: strings.Repeat("é", 127)},
		{name: "four-byte runes are cut whole", filename: strings.Repeat("😀", 300), content: []byte("emoji"),
			wantFilename: strings.Repeat("😀", 63)},
		// Trimming used to drop one rune per pass, converting the whole name
		// each time: a name of 60,000 bytes took 6.5 s.
		{name: "a name of 60,000 bytes", filename: strings.Repeat("a", 60_000), content: []byte("very long"),
			wantFilename: strings.Repeat("a", 255)},
		{name: "exactly the size limit", filename: "max.bin", content: bytes.Repeat([]byte{'x'}, maxUpload),
			contentType: "application/octet-stream", wantFilename: "max.bin", wantDeclared: "application/octet-stream"},
		{name: "empty file", filename: "empty.txt", content: []byte{}, wantFilename: "empty.txt"},
		{name: "file part without a filename", content: []byte("a plain field named file"), wantFilename: ""},
		{name: "with notify", filename: "n.txt", content: []byte("notify me"), notify: "  ops@example.com ",
			wantFilename: "n.txt", wantNotify: "ops@example.com"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			parts := []part{{name: "file", filename: tt.filename, contentType: tt.contentType, content: tt.content, disposition: tt.disposition}}
			if tt.notify != "" {
				parts = append(parts, fieldPart("notify", tt.notify))
			}
			before := time.Now().UTC()
			id := wantAcceptedDocument(t, e.upload(t, parts))
			sum := sha256Hex(tt.content)

			es := e.entries(t, events.TypeDocumentUploaded)
			if len(es) != 1 {
				t.Fatalf("%d document.uploaded entries, want 1", len(es))
			}
			en := es[0]
			if en.Meta[bus.MetaEventID] != en.ID || en.Meta[bus.MetaEventType] != events.TypeDocumentUploaded {
				t.Errorf("envelope %v of entry %s", en.Meta, en.ID)
			}
			var ev events.DocumentUploaded
			if err := json.Unmarshal(en.Payload, &ev); err != nil {
				t.Fatalf("payload %s: %v", en.Payload, err)
			}
			if ev.DocID != id || ev.Size != int64(len(tt.content)) || ev.SHA256 != sum || ev.BlobKey != sum ||
				ev.Filename != tt.wantFilename || ev.DeclaredContentType != tt.wantDeclared {
				t.Errorf("event %+v, want doc_id %s, size %d, sha256 and blob_key %s, filename %q, declared %q",
					ev, id, len(tt.content), sum, tt.wantFilename, tt.wantDeclared)
			}
			if tt.wantNotify == "" && ev.Notify != "" {
				t.Errorf("notify = %q, want none", ev.Notify)
			}
			if tt.wantNotify != "" {
				addr, err := events.ParseAddress(ev.Notify)
				if err != nil || addr.Address != tt.wantNotify {
					t.Errorf("notify = %q (%v), want the address %s", ev.Notify, err, tt.wantNotify)
				}
			}
			if ev.UploadedAt.Before(before.Add(-time.Minute)) || ev.UploadedAt.After(time.Now().Add(time.Minute)) {
				t.Errorf("uploaded_at = %s, want about now", ev.UploadedAt)
			}
			if err := ev.Validate(); err != nil {
				t.Errorf("published event does not validate: %v", err)
			}

			if files := e.blobFiles(t); !slices.Equal(files, []string{blobPath(sum)}) {
				t.Errorf("blob dir holds %v, want only %s", files, blobPath(sum))
			}
			if got := e.readBlob(t, sum); !bytes.Equal(got, tt.content) {
				t.Errorf("stored %d bytes, want the %d sent", len(got), len(tt.content))
			}

			// No projector runs: the read is answered from what the api
			// accepted, never 404.
			doc := e.readDocument(t, id)
			if doc.DocID != id || doc.Status != store.DocumentProcessing {
				t.Errorf("read %+v, want doc_id %s processing", doc, id)
			}
			if doc.Filename == nil || *doc.Filename != tt.wantFilename || doc.Size == nil || *doc.Size != int64(len(tt.content)) ||
				doc.SHA256 == nil || *doc.SHA256 != sum || doc.UploadedAt == nil || !doc.UploadedAt.Equal(ev.UploadedAt) {
				t.Errorf("read %+v, want the upload's filename, size, sha256 and uploaded_at", doc)
			}
			if doc.ProcessedAt != nil || doc.Words != nil || doc.Summary != nil || doc.Error != nil {
				t.Errorf("read %+v, want no processing outcome yet", doc)
			}
		})
	}
}

// TestPostDocument_refused covers uploads that are refused: nothing is
// kept, neither bytes (final or temp) nor an event nor an accepted marker.
func TestPostDocument_refused(t *testing.T) {
	t.Parallel()
	small := []byte("small enough")
	tests := []struct {
		name      string
		req       func(t *testing.T, e *env) *http.Request
		status    int
		code      string
		wantField string
	}{
		{
			name: "multipart without a file part",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, fieldPart("notify", "ops@example.com"), fieldPart("other", "x"))
			},
			status: http.StatusBadRequest, code: "missing_file",
		},
		{
			name: "JSON body",
			req: func(t *testing.T, e *env) *http.Request {
				return e.request(t, http.MethodPost, "/v1/documents", strings.NewReader(`{"file":"aGVsbG8="}`), "Content-Type", "application/json")
			},
			status: http.StatusUnsupportedMediaType, code: "unsupported_media_type",
		},
		{
			name: "no Content-Type",
			req: func(t *testing.T, e *env) *http.Request {
				body, _ := multipartBody(t, filePart("a.txt", small))
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body))
			},
			status: http.StatusUnsupportedMediaType, code: "unsupported_media_type",
		},
		{
			name: "multipart without a boundary",
			req: func(t *testing.T, e *env) *http.Request {
				body, _ := multipartBody(t, filePart("a.txt", small))
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", "multipart/form-data")
			},
			status: http.StatusUnsupportedMediaType, code: "unsupported_media_type",
		},
		{
			name: "file one byte over the limit",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, filePart("big.bin", bytes.Repeat([]byte{'x'}, maxUpload+1)))
			},
			status: http.StatusRequestEntityTooLarge, code: "too_large",
		},
		{
			name: "file far over the limit, streamed without a length",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("big.bin", bytes.Repeat([]byte{'x'}, 200<<10)))
				return e.request(t, http.MethodPost, "/v1/documents", streamed{bytes.NewReader(body)}, "Content-Type", ct)
			},
			status: http.StatusRequestEntityTooLarge, code: "too_large",
		},
		{
			name: "body over the limit after a stored file",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("a.txt", small), fieldPart("padding", strings.Repeat("p", 70<<10)))
				return e.request(t, http.MethodPost, "/v1/documents", streamed{bytes.NewReader(body)}, "Content-Type", ct)
			},
			status: http.StatusRequestEntityTooLarge, code: "too_large",
		},
		{
			name: "invalid notify after the file",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, filePart("a.txt", small), fieldPart("notify", "not an address"))
			},
			status: http.StatusUnprocessableEntity, code: "validation_failed", wantField: "notify",
		},
		{
			name: "invalid notify before the file",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, fieldPart("notify", "ops@example.com\r\nBcc: x@example.com"), filePart("a.txt", small))
			},
			status: http.StatusUnprocessableEntity, code: "validation_failed", wantField: "notify",
		},
		{
			name: "notify too long",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, filePart("a.txt", small), fieldPart("notify", strings.Repeat("a", 1100)+"@example.com"))
			},
			status: http.StatusUnprocessableEntity, code: "validation_failed", wantField: "notify",
		},
		{
			name: "two file parts",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, filePart("a.txt", small), filePart("b.txt", []byte("another")))
			},
			status: http.StatusBadRequest, code: "bad_request",
		},
		{
			name: "file part cut short",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("a.txt", small))
				body = body[:bytes.Index(body, small)+4]
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct)
			},
			status: http.StatusBadRequest, code: "bad_multipart",
		},
		{
			name: "control character in a part header",
			req: func(t *testing.T, e *env) *http.Request {
				return uploadRequest(t, e, filePart("a\x01b.txt", small))
			},
			status: http.StatusBadRequest, code: "bad_multipart",
		},
		{
			name: "body cut short after a stored file",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("a.txt", small), fieldPart("notify", "ops@example.com"))
				body = body[:bytes.Index(body, []byte("ops@exa"))+len("ops@exa")]
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct)
			},
			status: http.StatusBadRequest, code: "bad_multipart",
		},
		{
			// Each part read whole, but no closing boundary: the fields
			// after the cut are lost, so the upload is refused.
			name: "body cut after the file part's end",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("a.txt", small), fieldPart("notify", "ops@example.com"))
				body = body[:bytes.Index(body, []byte("Content-Disposition: form-data; name=\"notify\""))]
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct)
			},
			status: http.StatusBadRequest, code: "bad_multipart",
		},
		{
			name: "body cut inside an unknown field after the file",
			req: func(t *testing.T, e *env) *http.Request {
				body, ct := multipartBody(t, filePart("a.txt", small), fieldPart("other", "some value"), fieldPart("notify", "ops@example.com"))
				body = body[:bytes.Index(body, []byte("some val"))+len("some val")]
				return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct)
			},
			status: http.StatusBadRequest, code: "bad_multipart",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			r := e.do(t, tt.req(t, e))
			detail := wantError(t, r, tt.status, tt.code)
			if tt.wantField != "" && !detail.names(tt.wantField) {
				t.Errorf("error.fields %v, want %q named", detail.fieldNames(), tt.wantField)
			}
			e.nothingKept(t)
		})
	}
}

// TestPostDocument_storageFull: a blob storage that is full answers 507,
// not the 503 of a passing outage, and keeps nothing.
func TestPostDocument_storageFull(t *testing.T) {
	t.Parallel()
	e := newEnv(t, withBlobs(func(s blob.Store) blob.Store { return fullStore{s} }))
	r := e.upload(t, []part{filePart("a.txt", []byte("no room for these"))})
	wantError(t, r, http.StatusInsufficientStorage, "insufficient_storage")
	e.nothingKept(t)
}

// fullStore is a blob storage whose disk is full: Put reads part of the
// bytes, then fails as a write to a full disk does.
type fullStore struct{ blob.Store }

func (fullStore) Put(_ context.Context, r io.Reader, _ int64) (blob.Info, error) {
	_, _ = io.CopyN(io.Discard, r, 4)
	return blob.Info{}, &os.PathError{Op: "write", Path: "tmp/put-1", Err: syscall.ENOSPC}
}

// uploadRequest builds an upload of parts.
func uploadRequest(t *testing.T, e *env, parts ...part) *http.Request {
	body, ct := multipartBody(t, parts...)
	return e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct)
}

// nothingKept checks that no upload left bytes, an event or an accepted
// marker behind.
func (e *env) nothingKept(t testing.TB) {
	t.Helper()
	if files := e.blobFiles(t); len(files) != 0 {
		t.Errorf("blob dir holds %v, want nothing", files)
	}
	e.noEntries(t, events.TypeDocumentUploaded)
	if keys := e.keys(t, "idem:accepted:*"); len(keys) != 0 {
		t.Errorf("accepted markers %v left behind", keys)
	}
}

// TestPostDocument_tooLargeByContentLength sends only the headers of a huge
// upload: the declared length alone is refused, before any byte is read.
func TestPostDocument_tooLargeByContentLength(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	conn, err := net.Dial("tcp", e.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(liveness)); err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprintf(conn, "POST /v1/documents HTTP/1.1\r\nHost: api\r\n"+
		"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: %d\r\n\r\n--xyz\r\n", int64(1)<<40)
	if err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer before the body was sent: %v", err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, response{status: res.StatusCode, header: res.Header, body: body}, http.StatusRequestEntityTooLarge, "too_large")
	e.nothingKept(t)
}

// TestPostDocument_refusedKeepsEarlierBytes checks that a refused upload of
// bytes another document already uses leaves them in place.
func TestPostDocument_refusedKeepsEarlierBytes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	content := []byte("shared bytes")
	wantAcceptedDocument(t, e.upload(t, []part{filePart("first.txt", content)}))
	r := e.upload(t, []part{filePart("second.txt", content), fieldPart("notify", "nope")})
	wantError(t, r, http.StatusUnprocessableEntity, "validation_failed")
	if got := e.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
		t.Errorf("stored bytes changed to %q", got)
	}
	if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
		t.Errorf("%d document.uploaded entries, want 1", n)
	}
}

// TestPostDocument_refusedKeepsBytesOfAConcurrentUpload: two uploads of the
// same bytes at once. The first stores them and is refused after (its
// notify field comes late, and is not an address); the second, accepted
// meanwhile, found them stored. The refused upload's cleanup must leave
// them: the accepted document needs its bytes.
func TestPostDocument_refusedKeepsBytesOfAConcurrentUpload(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	content := []byte("the same bytes, twice at once")
	body, ct := multipartBody(t, filePart("first.txt", content), fieldPart("notify", "not an address"))
	// Up to the notify part's headers: the file part is complete.
	cut := bytes.Index(body, []byte(`name="notify"`))
	pr, pw := io.Pipe()
	first := make(chan response, 1)
	go func() {
		r, err := e.send(e.request(t, http.MethodPost, "/v1/documents", pr, "Content-Type", ct))
		if err != nil {
			t.Error(err)
		}
		first <- r
	}()
	if _, err := pw.Write(body[:cut]); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(e.blobDir, blobPath(sha256Hex(content)))); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first upload did not store its bytes")
		}
		time.Sleep(5 * time.Millisecond)
	}
	id := wantAcceptedDocument(t, e.upload(t, []part{filePart("second.txt", content)}))
	if _, err := pw.Write(body[cut:]); err != nil {
		t.Fatal(err)
	}
	_ = pw.Close()
	wantError(t, <-first, http.StatusUnprocessableEntity, "validation_failed")
	if got := e.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
		t.Fatalf("the bytes of accepted document %s are %q, want them kept", id, got)
	}
}

// TestPostDocument_publishFails covers a Redis that cannot take the event:
// the client gets 503 and no doc_id. The stored bytes are removed when the
// event surely was not appended; when that cannot be known (Redis stays
// unreachable, and a write may have landed before the connection broke)
// they are kept, since an accepted document must find its bytes.
func TestPostDocument_publishFails(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// env returns the API under test, whose publishing fails.
		env func(t *testing.T) *env
		// kept is whether the bytes stay: the outcome is unknown.
		kept bool
	}{
		{name: "closed client", env: func(t *testing.T) *env { return newEnv(t, withPublisherRedis(closedRedis(t))) }},
		{name: "nothing listening", env: func(t *testing.T) *env { return newEnv(t, withPublisherRedis(deadRedis(t))) }, kept: true},
		{name: "Redis refuses the append", env: func(t *testing.T) *env {
			// The stream's key holds a string: Redis answers XADD with
			// WRONGTYPE, and then confirms that nothing was appended.
			e := newEnv(t)
			e.refuseAppends(t, events.TypeDocumentUploaded)
			return e
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := tt.env(t)
			content := []byte("bytes that cannot be announced")
			r := e.upload(t, []part{filePart("a.txt", content), fieldPart("notify", "ops@example.com")})
			wantError(t, r, http.StatusServiceUnavailable, "unavailable")
			if loc := r.header.Get("Location"); loc != "" {
				t.Errorf("Location %q on a refused upload", loc)
			}
			if keys := e.keys(t, "idem:accepted:*"); len(keys) != 0 {
				t.Errorf("accepted markers %v left behind", keys)
			}
			if keys, err := e.rdb.Keys(t.Context(), bus.OnceKey(e.prefix+events.TypeDocumentUploaded, "*")).Result(); err != nil || len(keys) != 0 {
				t.Errorf("once markers %v left behind by an append that did not happen (%v)", keys, err)
			}
			files := e.blobFiles(t)
			switch {
			case tt.kept && (len(files) != 1 || !bytes.Equal(e.readBlob(t, sha256Hex(content)), content)):
				t.Errorf("blob dir holds %v, want the upload's bytes kept", files)
			case !tt.kept && len(files) != 0:
				t.Errorf("blob dir holds %v, want nothing", files)
			}
		})
	}
}

// TestPostDocument_retryAfterUnknownOutcome: the first attempt's publish
// fails in a way that leaves its outcome unknown, and the client retries
// with the same Idempotency-Key on another replica. The retry finishes the
// first attempt: the same doc_id, one event, the bytes there, and a read
// that answers at once.
func TestPostDocument_retryAfterUnknownOutcome(t *testing.T) {
	t.Parallel()
	content := []byte("uploaded while Redis was away")
	for _, landed := range []bool{false, true} {
		t.Run(fmt.Sprintf("first append landed %v", landed), func(t *testing.T) {
			t.Parallel()
			down := newEnv(t, withPublisherRedis(deadRedis(t)))
			r := down.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "flaky-1")
			wantError(t, r, http.StatusServiceUnavailable, "unavailable")
			if files := down.blobFiles(t); len(files) != 1 {
				t.Fatalf("blob dir holds %v after an unknown outcome, want the bytes kept", files)
			}
			up := newEnv(t, withSharedState(down))
			if landed {
				// The append happened although the first replica saw an
				// error: publish the prepared event as it would have been.
				rec := preparedRecord(t, up, "key:upload:flaky-1")
				ev, err := events.Decode(rec.Pending.EventType, 0, rec.Pending.Payload)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := up.publisher.PublishEvent(t.Context(), ev, bus.WithID(rec.Pending.EventID), bus.WithOnce(time.Hour)); err != nil {
					t.Fatal(err)
				}
			}
			retry := up.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "flaky-1")
			id := wantAcceptedDocument(t, retry)
			if retry.header.Get("Idempotent-Replayed") != "true" {
				t.Errorf("the retry that finished the first attempt is not marked as a replay")
			}
			if n := len(up.entries(t, events.TypeDocumentUploaded)); n != 1 {
				t.Errorf("%d document.uploaded entries, want 1", n)
			}
			again := up.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "flaky-1")
			if got := wantAcceptedDocument(t, again); got != id {
				t.Errorf("a later retry answered doc_id %s, want %s", got, id)
			}
			if n := len(up.entries(t, events.TypeDocumentUploaded)); n != 1 {
				t.Errorf("%d document.uploaded entries after another retry, want 1", n)
			}
			if got := up.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
				t.Errorf("stored bytes %q, want %q", got, content)
			}
			view := up.get(t, "/v1/documents/"+id)
			wantStatus(t, view, http.StatusOK)
		})
	}
}

// TestPostDocument_retryAfterSureFailure: under an Idempotency-Key, the
// first attempt's publish surely fails (Redis refuses the append), yet its
// prepared record lets a retry finish it, so its bytes must stay: the
// retry publishes the first attempt's event, which refers to them.
func TestPostDocument_retryAfterSureFailure(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stream := e.refuseAppends(t, events.TypeDocumentUploaded)
	content := []byte("refused first, finished by the retry")
	r := e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "refused-1")
	wantError(t, r, http.StatusServiceUnavailable, "unavailable")
	if files := e.blobFiles(t); len(files) != 1 {
		t.Fatalf("blob dir holds %v after a refused append under a key, want the bytes kept", files)
	}
	if err := e.rdb.Del(t.Context(), stream).Err(); err != nil {
		t.Fatal(err)
	}
	id := wantAcceptedDocument(t, e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "refused-1"))
	entries := e.entries(t, events.TypeDocumentUploaded)
	if len(entries) != 1 {
		t.Fatalf("%d document.uploaded entries, want 1", len(entries))
	}
	if got := e.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
		t.Errorf("stored bytes %q, want %q: the published event %s refers to them", got, content, id)
	}
}

// TestPostDocument_retryStoresTheBytesAgain: a retry that finishes a
// prepared upload stores its bytes again, since the event it publishes
// refers to them and they may have been removed since the first attempt
// (blob retention removes the bytes of a failed document that had the same
// content). A retry with other bytes under the key is refused and leaves
// nothing behind.
func TestPostDocument_retryStoresTheBytesAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stream := e.refuseAppends(t, events.TypeDocumentUploaded)
	content := []byte("bytes removed before the retry")
	wantError(t, e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "removed-1"), http.StatusServiceUnavailable, "unavailable")
	files := e.blobFiles(t)
	if len(files) != 1 {
		t.Fatalf("blob dir holds %v after a refused append under a key, want the bytes kept", files)
	}
	if err := os.Remove(filepath.Join(e.blobDir, files[0])); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Del(t.Context(), stream).Err(); err != nil {
		t.Fatal(err)
	}

	other := e.upload(t, []part{filePart("a.txt", []byte("other bytes"))}, "Idempotency-Key", "removed-1")
	wantError(t, other, http.StatusUnprocessableEntity, "idempotency_key_reused")
	if files := e.blobFiles(t); len(files) != 0 {
		t.Fatalf("blob dir holds %v after a retry with other bytes was refused, want nothing", files)
	}
	e.noEntries(t, events.TypeDocumentUploaded)

	id := wantAcceptedDocument(t, e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "removed-1"))
	if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
		t.Errorf("%d document.uploaded entries, want 1", n)
	}
	if got := e.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
		t.Errorf("stored bytes %q, want %q: the published event %s refers to them", got, content, id)
	}
}

// TestPostDocument_retryAfterUnknownPrepare: the record of the prepared
// event is written, but its reply is lost with the connection, and the
// release of the key fails too (Redis went away). The record is there, so
// a retry publishes its event: the bytes it refers to must still be there.
func TestPostDocument_retryAfterUnknownPrepare(t *testing.T) {
	t.Parallel()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	flaky := redis.NewClient(opt)
	flaky.AddHook(lostWrites{})
	t.Cleanup(func() { _ = flaky.Close() })
	down := newEnv(t, withIdemRedis(flaky))
	content := []byte("prepared while Redis went away")
	r := down.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "lost-prepare-1")
	wantError(t, r, http.StatusServiceUnavailable, "unavailable")
	if files := down.blobFiles(t); len(files) != 1 {
		t.Fatalf("blob dir holds %v after a prepare whose outcome is unknown, want the bytes kept", files)
	}
	preparedRecord(t, down, "key:upload:lost-prepare-1")

	up := newEnv(t, withSharedState(down))
	id := wantAcceptedDocument(t, up.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "lost-prepare-1"))
	if n := len(up.entries(t, events.TypeDocumentUploaded)); n != 1 {
		t.Errorf("%d document.uploaded entries, want 1", n)
	}
	if got := up.readBlob(t, sha256Hex(content)); !bytes.Equal(got, content) {
		t.Errorf("stored bytes %q, want %q: the published event %s refers to them", got, content, id)
	}
}

// lostWrites is a Redis client hook for a connection lost mid-write once
// an idempotency key is claimed: a write of the record (a plain SET, or the
// owner-checked script's "set", not the claim's SET NX) is written but its
// reply is lost, and a release (DEL, or the script's "release") never
// reaches Redis.
type lostWrites struct{}

func (lostWrites) DialHook(next redis.DialHook) redis.DialHook { return next }

func (lostWrites) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		script := cmd.Name() == "evalsha" || cmd.Name() == "eval"
		switch {
		case cmd.Name() == "set" && !slices.Contains(args, any("nx")),
			script && slices.Contains(args, any("set")):
			if err := next(ctx, cmd); err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
				return err // the client sends the script itself next
			}
		case cmd.Name() == "del", script && slices.Contains(args, any("release")):
		default:
			return next(ctx, cmd)
		}
		err := &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
		cmd.SetErr(err)
		return err
	}
}

func (lostWrites) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// preparedRecord returns the idempotency record of a request that
// prepared its event.
func preparedRecord(t testing.TB, e *env, key string) idem.Record {
	t.Helper()
	raw, ok, err := e.idem.Get(t.Context(), key)
	if err != nil || !ok {
		t.Fatalf("idempotency record %s: found %v, %v", key, ok, err)
	}
	var rec idem.Record
	if err := json.Unmarshal([]byte(raw), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Done || rec.Pending == nil {
		t.Fatalf("idempotency record %s is %s, want a prepared one", key, raw)
	}
	return rec
}

func TestPostDocument_idempotencyKey(t *testing.T) {
	t.Parallel()

	t.Run("retry returns the first answer and publishes once", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		content := []byte("upload once")
		first := e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "upload-1")
		id := wantAcceptedDocument(t, first)
		if first.header.Get("Idempotent-Replayed") != "" {
			t.Errorf("first answer says Idempotent-Replayed")
		}
		for range 2 {
			again := e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "upload-1")
			if got := wantAcceptedDocument(t, again); got != id {
				t.Errorf("retry answered doc_id %s, want %s", got, id)
			}
			if again.header.Get("Idempotent-Replayed") != "true" {
				t.Errorf("Idempotent-Replayed = %q, want true", again.header.Get("Idempotent-Replayed"))
			}
		}
		if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
			t.Errorf("%d document.uploaded entries, want 1", n)
		}
		if files := e.blobFiles(t); len(files) != 1 {
			t.Errorf("blob dir holds %v, want one file", files)
		}
		// Another key is another upload.
		other := wantAcceptedDocument(t, e.upload(t, []part{filePart("a.txt", content)}, "Idempotency-Key", "upload-2"))
		if other == id {
			t.Errorf("another key answered the same doc_id")
		}
	})

	t.Run("a refused request does not use up the key", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		r := e.upload(t, []part{filePart("a.txt", []byte("x")), fieldPart("notify", "bad")}, "Idempotency-Key", "k")
		wantError(t, r, http.StatusUnprocessableEntity, "validation_failed")
		r = e.upload(t, []part{filePart("a.txt", []byte("x")), fieldPart("notify", "ops@example.com")}, "Idempotency-Key", "k")
		id := wantAcceptedDocument(t, r)
		if r.header.Get("Idempotent-Replayed") != "" {
			t.Errorf("a fresh run says Idempotent-Replayed")
		}
		r = e.upload(t, []part{filePart("a.txt", []byte("x")), fieldPart("notify", "ops@example.com")}, "Idempotency-Key", "k")
		if got := wantAcceptedDocument(t, r); got != id || r.header.Get("Idempotent-Replayed") != "true" {
			t.Errorf("retry answered %s (replayed %q), want the replay of %s", got, r.header.Get("Idempotent-Replayed"), id)
		}
	})

	t.Run("a key reused for another upload gets 422", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		upload := func(content, filename, notify string) response {
			parts := []part{filePart(filename, []byte(content))}
			if notify != "" {
				parts = append(parts, fieldPart("notify", notify))
			}
			return e.upload(t, parts, "Idempotency-Key", "same-key")
		}
		id := wantAcceptedDocument(t, upload("the bytes", "a.txt", "ops@example.com"))
		// The body's fingerprint has a field of its own: a replica that
		// predates it compares the request fingerprint ("" for uploads)
		// only, and keeps replaying during a rolling deploy.
		raw, ok, err := e.idem.Get(t.Context(), "key:upload:same-key")
		var rec idem.Record
		if err != nil || !ok || json.Unmarshal([]byte(raw), &rec) != nil {
			t.Fatalf("record of the key: %q, %v, %v", raw, ok, err)
		}
		if rec.Fingerprint != "" || rec.BodyFingerprint == "" {
			t.Fatalf("record fingerprints %q / body %q, want none / the body's", rec.Fingerprint, rec.BodyFingerprint)
		}
		for _, tt := range []struct{ name, content, filename, notify string }{
			{"other bytes", "other bytes", "a.txt", "ops@example.com"},
			{"another name", "the bytes", "b.txt", "ops@example.com"},
			{"another notify address", "the bytes", "a.txt", "dev@example.com"},
			{"no notify address", "the bytes", "a.txt", ""},
		} {
			wantError(t, upload(tt.content, tt.filename, tt.notify), http.StatusUnprocessableEntity, "idempotency_key_reused")
		}
		// The same upload again (the address written differently, as the
		// event records it the same) is the replay.
		r := upload("the bytes", "a.txt", " ops@example.com ")
		if got := wantAcceptedDocument(t, r); got != id || r.header.Get("Idempotent-Replayed") != "true" {
			t.Errorf("retry answered %s (replayed %q), want the replay of %s", got, r.header.Get("Idempotent-Replayed"), id)
		}
		if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
			t.Errorf("%d document.uploaded entries, want 1", n)
		}
		if files := e.blobFiles(t); len(files) != 1 {
			t.Errorf("blob dir holds %v, want the first upload's bytes only", files)
		}
	})

	t.Run("key too long", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		r := e.upload(t, []part{filePart("a.txt", []byte("x"))}, "Idempotency-Key", strings.Repeat("k", 256))
		wantError(t, r, http.StatusBadRequest, "bad_idempotency_key")
		e.nothingKept(t)
	})

	t.Run("a retry while the first upload still streams gets 409", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		finish := e.startSlowUpload(t, "slow")
		r := e.upload(t, []part{filePart("slow.txt", []byte("other"))}, "Idempotency-Key", "slow")
		wantError(t, r, http.StatusConflict, "request_in_progress")
		e.acceptedOnce(t, finish(), "slow")
	})

	// The first request keeps its claim for as long as it runs: a retry
	// after several leases still finds it in progress.
	t.Run("an upload slower than the key's lease keeps its key", func(t *testing.T) {
		t.Parallel()
		// The claim is kept every second: only a keep stalled for two
		// seconds loses it.
		const lease = 3 * time.Second
		e := newEnv(t, withIdempotencyLease(lease))
		finish := e.startSlowUpload(t, "slow")
		// The upload outlasts its claim's first lease: the claim lives on
		// only as it is kept.
		testenv.WaitRenewed(t, e.rdb, e.prefix+"idem:key:upload:slow", lease, 2)
		r := e.upload(t, []part{filePart("slow.txt", []byte("other"))}, "Idempotency-Key", "slow")
		wantError(t, r, http.StatusConflict, "request_in_progress")
		e.acceptedOnce(t, finish(), "slow")
	})

	// A request stalled past its lease (a paused replica) whose key another
	// request claimed meanwhile publishes nothing when it resumes, and
	// leaves the other request's claim alone: that one does the work.
	t.Run("an upload whose claim was taken over publishes nothing", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		finish := e.startSlowUpload(t, "slow")
		rkey := "key:upload:slow"
		if err := e.idem.Delete(t.Context(), rkey); err != nil { // the lease ran out
			t.Fatal(err)
		}
		other, claimed, err := e.idem.Claim(t.Context(), rkey, "", time.Minute)
		if err != nil || !claimed {
			t.Fatalf("other request's claim: %v, %v", claimed, err)
		}
		wantError(t, finish(), http.StatusConflict, "request_in_progress")
		e.noEntries(t, events.TypeDocumentUploaded)
		rec, claimed, err := e.idem.Claim(t.Context(), rkey, "", time.Minute)
		if err != nil || claimed || rec.Owner != other.Owner || rec.Pending != nil || rec.Done {
			t.Errorf("record of the key %+v (claimed %v, %v), want the other request's claim", rec, claimed, err)
		}
		if files := e.blobFiles(t); len(files) != 0 {
			t.Errorf("blob dir holds %v, want nothing: the upload was not accepted", files)
		}
	})
}

// slowBody is what startSlowUpload sends: its first half, then, when
// finish is called, the rest.
const slowBody = "first half, second half"

// startSlowUpload starts an upload under Idempotency-Key key whose body
// stops halfway, and returns once the api holds the key (its temp file
// exists). finish sends the rest and returns the answer.
func (e *env) startSlowUpload(t *testing.T, key string) (finish func() response) {
	t.Helper()
	pr, pw := io.Pipe()
	// Registered after the server's, so it runs first: a test that
	// stops early ends the upload, and the server can close.
	t.Cleanup(func() { _ = pw.CloseWithError(io.ErrUnexpectedEOF) })
	mw := multipart.NewWriter(pw)
	req := e.request(t, http.MethodPost, "/v1/documents", streamed{pr},
		"Content-Type", mw.FormDataContentType(), "Idempotency-Key", key)
	done := make(chan response, 1)
	go func() {
		r, err := e.send(req)
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	fw, err := mw.CreateFormFile("file", "slow.txt")
	if err != nil {
		t.Fatal(err)
	}
	half := len(slowBody) / 2
	if _, err := fw.Write([]byte(slowBody[:half])); err != nil {
		t.Fatal(err)
	}
	// The api writes the file to a temp file as it arrives: once one
	// exists, the first request holds the key.
	e.waitFor(t, "the upload's temp file", func() bool {
		entries, _ := os.ReadDir(filepath.Join(e.blobDir, "tmp"))
		return len(entries) > 0
	})
	return func() response {
		t.Helper()
		if _, err := fw.Write([]byte(slowBody[half:])); err != nil {
			t.Fatal(err)
		}
		if err := mw.Close(); err != nil {
			t.Fatal(err)
		}
		if err := pw.Close(); err != nil {
			t.Fatal(err)
		}
		return <-done
	}
}

// acceptedOnce checks that first, the answer to startSlowUpload's upload,
// accepted it, that a retry with the same upload and key replays it, and
// that it was stored and published once.
func (e *env) acceptedOnce(t *testing.T, first response, key string) {
	t.Helper()
	id := wantAcceptedDocument(t, first)
	// The same upload (CreateFormFile's part type included) is replayed.
	same := part{name: "file", filename: "slow.txt", contentType: "application/octet-stream", content: []byte(slowBody)}
	r := e.upload(t, []part{same}, "Idempotency-Key", key)
	if got := wantAcceptedDocument(t, r); got != id {
		t.Errorf("retry after the first finished answered %s, want %s", got, id)
	}
	sum := sha256Hex([]byte(slowBody))
	if files := e.blobFiles(t); !slices.Equal(files, []string{blobPath(sum)}) {
		t.Errorf("blob dir holds %v, want only the first upload's bytes %s", files, blobPath(sum))
	}
	if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
		t.Errorf("%d document.uploaded entries, want 1", n)
	}
}

// waitFor polls cond until it holds; the bound only ends a broken test.
func (e *env) waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(liveness)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %s", what, liveness)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPostDocument_slowBodyStillAnswered: the server's write timeout runs
// from the request's start; an upload whose body took longer than that
// still gets its answer (the event is published: without an answer the
// client would upload again).
func TestPostDocument_slowBodyStillAnswered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	srv := httptest.NewUnstartedServer(e.srv.Config.Handler)
	srv.Config.WriteTimeout = 300 * time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)
	body, ct := multipartBody(t, filePart("slow.txt", []byte("a body that arrives slowly")))
	pr, pw := io.Pipe()
	go func() {
		// The body takes about a second: past the write timeout.
		for i := 0; i < len(body); i += len(body)/4 + 1 {
			_, _ = pw.Write(body[i:min(len(body), i+len(body)/4+1)])
			time.Sleep(250 * time.Millisecond)
		}
		_ = pw.Close()
	}()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL+"/v1/documents", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ct)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("upload whose body outlasted the write timeout: %v", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("status %d, %q (%v), want 202", resp.StatusCode, raw, err)
	}
	if n := len(e.entries(t, events.TypeDocumentUploaded)); n != 1 {
		t.Errorf("%d document.uploaded entries, want 1", n)
	}
}

// TestPostDocument_concurrentUploadsAreBounded: with MaxConcurrentUploads
// uploads receiving their bodies, one more waits for a slot: it gets one
// when an upload ends within UploadWait, and 503 too_many_uploads with
// Retry-After, keeping nothing, when none ends in time.
func TestPostDocument_concurrentUploadsAreBounded(t *testing.T) {
	t.Parallel()
	e := newEnv(t, withUploadLimit(1, 300*time.Millisecond))
	// A stalled upload: its body arrives up to the file's last bytes.
	stalled := func() (finish func() response) {
		body, ct := multipartBody(t, filePart("slow.txt", []byte("a slow client's upload")))
		pr, pw := io.Pipe()
		done := make(chan response, 1)
		go func() {
			r, err := e.send(e.request(t, http.MethodPost, "/v1/documents", pr, "Content-Type", ct))
			if err != nil {
				t.Error(err)
			}
			done <- r
		}()
		if _, err := pw.Write(body[:len(body)-20]); err != nil {
			t.Fatal(err)
		}
		e.waitUploadsInFlight(t, 1)
		return func() response {
			if _, err := pw.Write(body[len(body)-20:]); err != nil {
				t.Fatal(err)
			}
			_ = pw.Close()
			return <-done
		}
	}

	finish := stalled()
	r := e.upload(t, []part{filePart("refused.txt", []byte("no slot for these bytes"))})
	wantError(t, r, http.StatusServiceUnavailable, "too_many_uploads")
	if got := r.header.Get("Retry-After"); got == "" {
		t.Error("503 too_many_uploads without Retry-After")
	}
	if _, err := os.Stat(filepath.Join(e.blobDir, blobPath(sha256Hex([]byte("no slot for these bytes"))))); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the refused upload's bytes: stat = %v, want them never stored", err)
	}
	wantAcceptedDocument(t, finish())
	e.waitUploadsInFlight(t, 0)

	// A slot freed while an upload waits for it: the waiting one goes on.
	e = newEnv(t, withUploadLimit(1, time.Minute))
	finish = stalled()
	waiting := make(chan response, 1)
	go func() {
		body, ct := multipartBody(t, filePart("waiting.txt", []byte("bytes that wait for a slot")))
		r, err := e.send(e.request(t, http.MethodPost, "/v1/documents", bytes.NewReader(body), "Content-Type", ct))
		if err != nil {
			t.Error(err)
		}
		waiting <- r
	}()
	select {
	case r := <-waiting:
		t.Fatalf("an upload beyond the limit was answered while the other ran: %s", r)
	case <-time.After(200 * time.Millisecond):
	}
	wantAcceptedDocument(t, finish())
	wantAcceptedDocument(t, <-waiting)
}

// waitUploadsInFlight waits until /metrics shows n uploads in progress.
func (e *env) waitUploadsInFlight(t *testing.T, n int) {
	t.Helper()
	want := fmt.Sprintf("conveyor_http_uploads_in_flight %d\n", n)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := e.do(t, e.request(t, http.MethodGet, "/metrics", nil))
		if strings.Contains(string(r.body), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("uploads in flight never became %d:\n%s", n, r.body)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
