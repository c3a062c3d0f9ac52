package api_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/blob"
)

func TestHealthz(t *testing.T) {
	t.Parallel()
	e := newEnv(t, withChecks(func(*env) map[string]api.Check {
		return map[string]api.Check{"postgres": func(context.Context) error { return errors.New("down") }}
	}))
	r := e.get(t, "/healthz")
	wantStatus(t, r, http.StatusOK)
	if body := decodeJSON[map[string]string](t, r); body["status"] != "ok" {
		t.Errorf("body %s, want status ok", r.body)
	}
}

func TestReadyz(t *testing.T) {
	t.Parallel()
	// secret stands for what an error may carry (an address, a user name)
	// and must never reach the public body.
	const secret = "postgres://conveyor:hunter2@10.0.0.7:5432"
	tests := []struct {
		name   string
		checks func(e *env) map[string]api.Check // nil: production's
		status int
		want   api.ReadinessBody
	}{
		{
			name:   "real dependencies up",
			checks: nil,
			status: http.StatusOK,
			want:   api.ReadinessBody{Status: "ready", Checks: map[string]string{"redis": "ok", "postgres": "ok"}},
		},
		{
			name: "postgres down",
			checks: func(e *env) map[string]api.Check {
				return map[string]api.Check{
					"redis":    func(ctx context.Context) error { return e.rdb.Ping(ctx).Err() },
					"postgres": func(context.Context) error { return errors.New("dial " + secret + ": connection refused") },
				}
			},
			status: http.StatusServiceUnavailable,
			want:   api.ReadinessBody{Status: "unavailable", Checks: map[string]string{"redis": "ok", "postgres": "down"}},
		},
		{
			name: "soft check down",
			checks: func(e *env) map[string]api.Check {
				return map[string]api.Check{
					"redis":    func(ctx context.Context) error { return e.rdb.Ping(ctx).Err() },
					"postgres": api.Soft(func(context.Context) error { return errors.New("dial " + secret + ": connection refused") }),
				}
			},
			status: http.StatusOK,
			want:   api.ReadinessBody{Status: "degraded", Checks: map[string]string{"redis": "ok", "postgres": "down"}},
		},
		{
			name: "soft check outlives its deadline",
			checks: func(e *env) map[string]api.Check {
				return map[string]api.Check{
					"redis":    func(ctx context.Context) error { return e.rdb.Ping(ctx).Err() },
					"postgres": api.Soft(func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }),
				}
			},
			status: http.StatusOK,
			want:   api.ReadinessBody{Status: "degraded", Checks: map[string]string{"redis": "ok", "postgres": "down"}},
		},
		{
			// A soft check failing too does not make it merely degraded.
			name: "hard and soft checks down",
			checks: func(e *env) map[string]api.Check {
				return map[string]api.Check{
					"redis":       func(context.Context) error { return errors.New("connection refused") },
					"cache_redis": api.Soft(func(context.Context) error { return errors.New("connection refused") }),
					"postgres":    api.Soft(e.store.Ping),
				}
			},
			status: http.StatusServiceUnavailable,
			want:   api.ReadinessBody{Status: "unavailable", Checks: map[string]string{"redis": "down", "cache_redis": "down", "postgres": "ok"}},
		},
		{
			name: "check outlives its deadline",
			checks: func(e *env) map[string]api.Check {
				return map[string]api.Check{
					"redis":    func(ctx context.Context) error { return e.rdb.Ping(ctx).Err() },
					"postgres": func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() },
				}
			},
			status: http.StatusServiceUnavailable,
			want:   api.ReadinessBody{Status: "unavailable", Checks: map[string]string{"redis": "ok", "postgres": "down"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, withChecks(tt.checks))
			r := e.get(t, "/readyz")
			wantStatus(t, r, tt.status)
			got := decodeJSON[api.ReadinessBody](t, r)
			if got.Status != tt.want.Status || !sameStrings(got.Checks, tt.want.Checks) {
				t.Errorf("body %s, want %+v", r.body, tt.want)
			}
			if strings.Contains(string(r.body), "hunter2") || strings.Contains(string(r.body), "refused") {
				t.Errorf("body %s carries error text", r.body)
			}
		})
	}
}

func sameStrings(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"s","body":"b"}`))
	wantError(t, e.postJSON(t, "/v1/emails", `{}`), http.StatusUnprocessableEntity, "validation_failed")
	r := e.get(t, "/metrics")
	wantStatus(t, r, http.StatusOK)
	for _, line := range []string{
		`conveyor_http_requests_total{code="202",route="POST /v1/emails"} 1`,
		`conveyor_http_requests_total{code="422",route="POST /v1/emails"} 1`,
		`conveyor_http_request_duration_seconds_count{route="POST /v1/emails"} 2`,
	} {
		if !strings.Contains(string(r.body), line+"\n") {
			t.Errorf("/metrics has no line %q:\n%s", line, r.body)
		}
	}
}

// Requests no route takes (404, 405, a path not in clean form) are counted
// under one route label, whatever their path, and a handler's panic is
// counted as the 500 it is answered with.
func TestMetricsCountUnmatchedAndPanics(t *testing.T) {
	t.Parallel()
	e := newEnv(t, withBlobs(func(s blob.Store) blob.Store { return panickingStore{s} }))
	wantError(t, e.get(t, "/v1/nothing"), http.StatusNotFound, "not_found")
	wantError(t, e.get(t, "/v1/other"), http.StatusNotFound, "not_found")
	wantError(t, e.postJSON(t, "/v1//emails", `{}`), http.StatusNotFound, "not_found")
	wantError(t, e.do(t, e.request(t, http.MethodPut, "/v1/emails", nil)), http.StatusMethodNotAllowed, "method_not_allowed")
	wantError(t, e.upload(t, []part{filePart("a.txt", []byte("hello"))}), http.StatusInternalServerError, "internal")
	r := e.get(t, "/metrics")
	wantStatus(t, r, http.StatusOK)
	for _, line := range []string{
		`conveyor_http_requests_total{code="404",route="unmatched"} 3`,
		`conveyor_http_requests_total{code="405",route="unmatched"} 1`,
		`conveyor_http_requests_total{code="500",route="POST /v1/documents"} 1`,
		`conveyor_http_request_duration_seconds_count{route="POST /v1/documents"} 1`,
	} {
		if !strings.Contains(string(r.body), line+"\n") {
			t.Errorf("/metrics has no line %q:\n%s", line, r.body)
		}
	}
}

// panickingStore panics on Put, as a bug in a handler would.
type panickingStore struct{ blob.Store }

func (panickingStore) Put(context.Context, io.Reader, int64) (blob.Info, error) {
	panic("blob store bug")
}

// A path the API does not have is 404; a method a path does not take is
// 405, naming the methods it does take (in Allow too). Both are JSON.
func TestUnknownEndpoints(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tests := []struct {
		name   string
		method string
		path   string
		allow  string // "" for a 404
	}{
		{name: "unknown path", method: http.MethodGet, path: "/v1/nothing"},
		{name: "root", method: http.MethodGet, path: "/"},
		{name: "old version", method: http.MethodPost, path: "/v0/documents"},
		{name: "id with a trailing segment", method: http.MethodPost, path: "/v1/emails/0190a0c0-0000-7000-8000-000000000001/x"},
		{name: "wrong method on a read", method: http.MethodDelete, path: "/v1/documents/0190a0c0-0000-7000-8000-000000000001", allow: "GET, HEAD"},
		{name: "POST to a read", method: http.MethodPost, path: "/v1/emails/0190a0c0-0000-7000-8000-000000000001", allow: "GET, HEAD"},
		{name: "wrong method on a write", method: http.MethodPut, path: "/v1/emails", allow: "POST"},
		{name: "GET of a collection", method: http.MethodGet, path: "/v1/events", allow: "POST"},
		{name: "POST to health", method: http.MethodPost, path: "/healthz", allow: "GET, HEAD"},
		// Paths not in clean form: not redirected to a route they did not
		// name.
		{name: "doubled slash", method: http.MethodPost, path: "/v1//emails"},
		{name: "dot segment", method: http.MethodPost, path: "/v1/./emails"},
		{name: "dot-dot segment", method: http.MethodPost, path: "/v1/emails/../events"},
		{name: "leading doubled slash", method: http.MethodPost, path: "//v1/events/batch"},
		{name: "trailing slash", method: http.MethodPost, path: "/v1/emails/"},
		{name: "doubled slash in a read", method: http.MethodGet, path: "/v1/documents//0190a0c0-0000-7000-8000-000000000001"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := e.do(t, e.request(t, tt.method, tt.path, nil))
			if tt.allow == "" {
				wantError(t, r, http.StatusNotFound, "not_found")
				return
			}
			detail := wantError(t, r, http.StatusMethodNotAllowed, "method_not_allowed")
			if got := r.header.Get("Allow"); got != tt.allow {
				t.Errorf("Allow = %q, want %q", got, tt.allow)
			}
			if !strings.Contains(detail.Message, tt.allow) {
				t.Errorf("message %q does not name the allowed methods %q", detail.Message, tt.allow)
			}
		})
	}
}
