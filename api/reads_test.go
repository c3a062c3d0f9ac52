package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// at is a fixed time with whole microseconds, which PostgreSQL keeps
// exactly.
var at = time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)

// project writes read models as the projector does: in one store
// transaction.
func (e *env) project(t testing.TB, fn func(ctx context.Context, tx *store.Tx) error) {
	t.Helper()
	if err := e.store.WithTx(t.Context(), func(tx *store.Tx) error { return fn(t.Context(), tx) }); err != nil {
		t.Fatalf("write read model: %v", err)
	}
}

func uploadedEvent(id, filename string) *events.DocumentUploaded {
	return &events.DocumentUploaded{DocID: id, Filename: filename, Size: 1234, SHA256: sha256Hex([]byte(id)),
		BlobKey: sha256Hex([]byte(id)), DeclaredContentType: "text/plain", UploadedAt: at}
}

func ptr[T any](v T) *T { return &v }

func TestGetDocument_projectedRow(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		outcome func(id string) events.Event
		want    func(id string) document
	}{
		{
			name: "processed",
			outcome: func(id string) events.Event {
				return &events.DocumentProcessed{DocID: id, ContentType: "text/plain; charset=utf-8", Words: 42, Lines: 7,
					Summary: "a summary", ProcessedAt: at.Add(time.Second)}
			},
			want: func(id string) document {
				return document{DocID: id, Status: store.DocumentProcessed, Filename: ptr("report.txt"), Size: ptr[int64](1234),
					ContentType: ptr("text/plain; charset=utf-8"), SHA256: ptr(sha256Hex([]byte(id))), Words: ptr[int64](42),
					Lines: ptr[int64](7), Summary: ptr("a summary"), UploadedAt: ptr(at), ProcessedAt: ptr(at.Add(time.Second))}
			},
		},
		{
			name: "failed",
			outcome: func(id string) events.Event {
				return &events.DocumentProcessingFailed{DocID: id, ContentType: "application/zip", Reason: "unsupported type",
					FailedAt: at.Add(2 * time.Second)}
			},
			want: func(id string) document {
				return document{DocID: id, Status: store.DocumentFailed, Filename: ptr("report.txt"), Size: ptr[int64](1234),
					ContentType: ptr("application/zip"), SHA256: ptr(sha256Hex([]byte(id))), Error: ptr("unsupported type"),
					UploadedAt: ptr(at), ProcessedAt: ptr(at.Add(2 * time.Second))}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			id := events.NewID()
			e.project(t, func(ctx context.Context, tx *store.Tx) error {
				if err := tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploadedEvent(id, "report.txt")}, nil); err != nil {
					return err
				}
				switch ev := tt.outcome(id).(type) {
				case *events.DocumentProcessed:
					return tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{ev})
				case *events.DocumentProcessingFailed:
					return tx.ApplyDocumentsFailed(ctx, []*events.DocumentProcessingFailed{ev})
				}
				return nil
			})
			got := e.readDocument(t, id)
			want := tt.want(id)
			if !sameDocument(got, want) {
				t.Errorf("read\n %s\nwant\n %s", showDocument(got), showDocument(want))
			}
		})
	}
}

func sameDocument(a, b document) bool {
	return a.DocID == b.DocID && a.Status == b.Status && eq(a.Filename, b.Filename) && eq(a.Size, b.Size) &&
		eq(a.ContentType, b.ContentType) && eq(a.SHA256, b.SHA256) && eq(a.Words, b.Words) && eq(a.Lines, b.Lines) &&
		eq(a.Summary, b.Summary) && eq(a.Error, b.Error) && sameTime(a.UploadedAt, b.UploadedAt) && sameTime(a.ProcessedAt, b.ProcessedAt)
}

func eq[T comparable](a, b *T) bool { return (a == nil) == (b == nil) && (a == nil || *a == *b) }

func sameTime(a, b *time.Time) bool { return (a == nil) == (b == nil) && (a == nil || a.Equal(*b)) }

func showDocument(d document) string {
	b, _ := json.Marshal(d)
	return string(b)
}

// TestGetDocument_cacheAside proves the second read is served by the cache
// without timing anything: the row changes behind the cache's back, the
// cached value is still served, and after an invalidation the new one is.
func TestGetDocument_cacheAside(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	id := events.NewID()
	e.project(t, func(ctx context.Context, tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploadedEvent(id, "before.txt")}, nil); err != nil {
			return err
		}
		return tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{{DocID: id, ContentType: "text/plain",
			Words: 1, Lines: 1, Summary: "s", ProcessedAt: at}})
	})
	if got := e.readDocument(t, id); got.Filename == nil || *got.Filename != "before.txt" {
		t.Fatalf("first read %s, want filename before.txt", showDocument(got))
	}

	// A write that does not invalidate, as a projector that crashed between
	// its commit and its invalidation would leave it.
	e.project(t, func(ctx context.Context, tx *store.Tx) error {
		return tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploadedEvent(id, "after.txt")}, nil)
	})
	if d, err := e.store.Document(t.Context(), id); err != nil || !d.Filename.Valid || d.Filename.String != "after.txt" {
		t.Fatalf("row %+v (%v), want filename after.txt", d, err)
	}
	if got := e.readDocument(t, id); got.Filename == nil || *got.Filename != "before.txt" {
		t.Errorf("second read %s, want the cached filename before.txt", showDocument(got))
	}

	if err := e.cache.Invalidate(t.Context(), store.DocumentKey(id)); err != nil {
		t.Fatal(err)
	}
	if got := e.readDocument(t, id); got.Filename == nil || *got.Filename != "after.txt" || got.Status != store.DocumentProcessed {
		t.Errorf("read after invalidation %s, want filename after.txt, processed", showDocument(got))
	}
}

// TestGetDocument_acceptedThenRow checks that the answer from the accepted
// marker is not cached: once the row exists, it is served.
func TestGetDocument_acceptedThenRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	id := wantAcceptedDocument(t, e.upload(t, []part{filePart("a.txt", []byte("hello"))}))
	if got := e.readDocument(t, id); got.Status != store.DocumentProcessing {
		t.Fatalf("read %s, want processing", showDocument(got))
	}
	es := e.entries(t, events.TypeDocumentUploaded)
	if len(es) != 1 {
		t.Fatalf("%d document.uploaded entries, want 1", len(es))
	}
	ev, err := events.Decode(events.TypeDocumentUploaded, 1, es[0].Payload)
	if err != nil {
		t.Fatal(err)
	}
	e.project(t, func(ctx context.Context, tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{ev.(*events.DocumentUploaded)}, []string{es[0].ID}); err != nil {
			return err
		}
		return tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{{DocID: id, ContentType: "text/plain; charset=utf-8",
			Words: 1, Lines: 1, Summary: "hello", ProcessedAt: time.Now()}})
	})
	got := e.readDocument(t, id)
	if got.Status != store.DocumentProcessed || got.Words == nil || *got.Words != 1 || got.Filename == nil || *got.Filename != "a.txt" {
		t.Errorf("read %s, want the processed row", showDocument(got))
	}
}

func TestGetDocument_errors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tests := []struct {
		name   string
		path   string
		status int
		code   string
	}{
		{name: "unknown id", path: "/v1/documents/" + events.NewID(), status: http.StatusNotFound, code: "not_found"},
		{name: "malformed id", path: "/v1/documents/not-a-uuid", status: http.StatusBadRequest, code: "malformed_id"},
		{name: "id with a trailing segment", path: "/v1/documents/" + events.NewID() + "/x", status: http.StatusNotFound, code: "not_found"},
		{name: "path traversal", path: "/v1/documents/..%2f..%2fetc%2fpasswd", status: http.StatusBadRequest, code: "malformed_id"},
		{name: "no id", path: "/v1/documents/", status: http.StatusNotFound, code: "not_found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			wantError(t, e.get(t, tt.path), tt.status, tt.code)
		})
	}
}

// TestGetDocument_uppercaseID reads an accepted upload by its id in capital
// letters, which is the same UUID.
func TestGetDocument_uppercaseID(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	id := wantAcceptedDocument(t, e.upload(t, []part{filePart("a.txt", []byte("hello"))}))
	got := e.readDocument(t, strings.ToUpper(id))
	if got.DocID != id || got.Status != store.DocumentProcessing {
		t.Errorf("read %s, want %s processing", showDocument(got), id)
	}

	// The projector invalidates the key of the lowercase id: a read in
	// capitals must not be left with a stale cached row.
	e.project(t, func(ctx context.Context, tx *store.Tx) error {
		return tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploadedEvent(id, "a.txt")}, nil)
	})
	if got := e.readDocument(t, strings.ToUpper(id)); got.Status != store.DocumentProcessing {
		t.Fatalf("read %s, want processing", showDocument(got))
	}
	e.project(t, func(ctx context.Context, tx *store.Tx) error {
		return tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{{DocID: id, ContentType: "text/plain",
			Words: 1, Lines: 1, Summary: "s", ProcessedAt: at}})
	})
	if err := e.cache.Invalidate(t.Context(), store.DocumentKey(id)); err != nil {
		t.Fatal(err)
	}
	if got := e.readDocument(t, strings.ToUpper(id)); got.Status != store.DocumentProcessed {
		t.Errorf("read in capitals after the projector's invalidation %s, want processed", showDocument(got))
	}
}

// TestGetDocument_databaseDown: a read the database cannot answer is a 503,
// not a 404 or a 500.
func TestGetDocument_databaseDown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if err := e.store.Close(); err != nil {
		t.Fatal(err)
	}
	wantError(t, e.get(t, "/v1/documents/"+events.NewID()), http.StatusServiceUnavailable, "unavailable")
	wantError(t, e.get(t, "/v1/emails/"+events.NewID()), http.StatusServiceUnavailable, "unavailable")
}

// TestGetNotProjected_markerUnreadable: an id the database does not have
// yet may be one the api accepted a moment ago; if the marker that says so
// cannot be read, the answer is 503, not 404 (an accepted id is never "not
// found").
func TestGetNotProjected_markerUnreadable(t *testing.T) {
	t.Parallel()
	e := newEnv(t, withIdemRedis(closedRedis(t)))
	wantError(t, e.get(t, "/v1/documents/"+events.NewID()), http.StatusServiceUnavailable, "unavailable")
	wantError(t, e.get(t, "/v1/emails/"+events.NewID()), http.StatusServiceUnavailable, "unavailable")
}

// TestReadsCacheOnlyRows: a read that finds no row (a 404, or the view of
// an accepted request not yet projected) caches nothing, so the row is
// served as soon as it is committed, with no invalidation. The projector
// relies on this: it does not invalidate the keys of the rows it creates.
func TestReadsCacheOnlyRows(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("document not found", func(t *testing.T) {
		t.Parallel()
		id := events.NewID()
		for range 2 {
			wantError(t, e.get(t, "/v1/documents/"+id), http.StatusNotFound, "not_found")
		}
		e.project(t, func(ctx context.Context, tx *store.Tx) error {
			return tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploadedEvent(id, "late.txt")}, nil)
		})
		if got := e.readDocument(t, id); got.Filename == nil || *got.Filename != "late.txt" {
			t.Errorf("read after the row was created %s, want late.txt", showDocument(got))
		}
	})

	email := func(id string) func(ctx context.Context, tx *store.Tx) error {
		return func(ctx context.Context, tx *store.Tx) error {
			if err := tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{{EmailID: id, To: "ann@example.com",
				Subject: "s", Body: "b", RequestedAt: at}}); err != nil {
				return err
			}
			return tx.ApplyEmailsSent(ctx, []*events.EmailSent{{EmailID: id, To: "ann@example.com",
				MessageID: "<m2@example.com>", Attempts: 1, SentAt: at.Add(time.Second)}})
		}
	}
	t.Run("email not found", func(t *testing.T) {
		t.Parallel()
		id := events.NewID()
		for range 2 {
			wantError(t, e.get(t, "/v1/emails/"+id), http.StatusNotFound, "not_found")
		}
		e.project(t, email(id))
		if got := e.readEmail(t, id); got.Status != store.EmailSent {
			t.Errorf("read after the row was created %+v, want sent", got)
		}
	})

	t.Run("email accepted, then projected", func(t *testing.T) {
		t.Parallel()
		id := wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"s","body":"b"}`))
		if got := e.readEmail(t, id); got.Status != store.EmailQueued {
			t.Fatalf("read right after the 202 %+v, want queued", got)
		}
		e.project(t, email(id))
		if got := e.readEmail(t, id); got.Status != store.EmailSent {
			t.Errorf("read after the row was created %+v, want sent", got)
		}
	})
}
