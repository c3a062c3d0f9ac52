package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"reflect"
	"strings"
	"syscall"
	"time"

	fastjson "github.com/goccy/go-json"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/store"
)

// EmailView is the JSON of an email.
type EmailView struct {
	EmailID   string     `json:"email_id"`
	Status    string     `json:"status"`
	To        *string    `json:"to"`
	Subject   *string    `json:"subject"`
	DocID     *string    `json:"doc_id"`
	Attempts  int        `json:"attempts"`
	SendAt    *time.Time `json:"send_at"`
	SentAt    *time.Time `json:"sent_at"`
	FailedAt  *time.Time `json:"failed_at"`
	Error     *string    `json:"error"`
	MessageID *string    `json:"message_id"`
}

func emailView(e store.Email) EmailView {
	return EmailView{
		EmailID:   e.EmailID,
		Status:    e.Status,
		To:        nullStr(e.Recipient.String, e.Recipient.Valid),
		Subject:   nullStr(e.Subject.String, e.Subject.Valid),
		DocID:     nullStr(e.DocID.String, e.DocID.Valid),
		Attempts:  e.Attempts,
		SendAt:    nullTime(e.SendAt.Time, e.SendAt.Valid),
		SentAt:    nullTime(e.SentAt.Time, e.SentAt.Valid),
		FailedAt:  nullTime(e.FailedAt.Time, e.FailedAt.Valid),
		Error:     nullStr(e.Error.String, e.Error.Valid),
		MessageID: nullStr(e.MessageID.String, e.MessageID.Valid),
	}
}

type emailRequest struct {
	To      string `json:"to"`
	Subject string `json:"subject"`
	Body    string `json:"body"`
	// SendAt (RFC 3339), if in the future, holds the email back until then.
	SendAt *jsonTime `json:"send_at,omitempty"`
}

// fingerprint identifies the request for its Idempotency-Key by what was
// decoded, not by the JSON it came in: the decoder matches member names
// without regard to case and keeps the last of those that match, so
// {"to":A,"TO":B} and {"TO":B,"to":A} are one JSON value (two members each)
// but two emails, to B and to A. A retry that encodes the same request
// again, its members in another order or its send_at in another zone, has
// the same fingerprint.
func (r emailRequest) fingerprint() string {
	decoded := struct {
		To      string     `json:"to"`
		Subject string     `json:"subject"`
		Body    string     `json:"body"`
		SendAt  *time.Time `json:"send_at"`
	}{To: r.To, Subject: r.Subject, Body: r.Body}
	if r.SendAt != nil {
		at := r.SendAt.UTC()
		decoded.SendAt = &at
	}
	b, _ := json.Marshal(decoded) // strings and a time: cannot fail
	return fingerprint(append([]byte("email\x00"), b...))
}

type acceptedEmail struct {
	EmailID string     `json:"email_id"`
	Status  string     `json:"status"`
	SendAt  *time.Time `json:"send_at,omitempty"`
}

func (a *API) postEmail(w http.ResponseWriter, r *http.Request) {
	body, ok := a.readJSONBody(w, r)
	if !ok {
		return
	}
	// Decoded before the Idempotency-Key is looked at, so that the key is
	// held to what was decoded (see emailRequest.fingerprint).
	var req emailRequest
	if status, resp, ok := decodeStrict(body, &req); !ok {
		writeJSON(w, status, resp)
		return
	}
	// Records written before fingerprints were of the decoded request hold
	// that of the JSON as a value, or before that of the bytes: a retry of
	// one must still match.
	fps := func() []string { return []string{req.fingerprint(), jsonFingerprint(body), fingerprint(body)} }
	a.idempotent(w, r, "email", fps, nil, func(r *http.Request) (int, any) {
		ev := &events.EmailRequested{
			EmailID:     events.NewID(),
			To:          strings.TrimSpace(req.To),
			Subject:     req.Subject,
			Body:        req.Body,
			RequestedAt: time.Now().UTC(),
		}
		if err := events.ValidateIngest(ev); err != nil {
			var ve *events.ValidationError
			if errors.As(err, &ve) {
				return http.StatusUnprocessableEntity, errorBody{Error: errorDetail{Code: "validation_failed", Message: ve.Error(), Fields: ve.Fields}}
			}
			return errResp(http.StatusUnprocessableEntity, "validation_failed", err.Error())
		}
		if req.SendAt != nil && req.SendAt.After(ev.RequestedAt) {
			if req.SendAt.After(ev.RequestedAt.Add(a.cfg.MaxDelay)) {
				return validationResp("send_at", fmt.Sprintf("must be at most %s ahead", humanDuration(a.cfg.MaxDelay)))
			}
			return a.scheduleEmail(r.Context(), ev, req.SendAt.UTC())
		}
		view := EmailView{EmailID: ev.EmailID, Status: store.EmailQueued, To: &ev.To, Subject: &ev.Subject}
		resp := acceptedEmail{EmailID: ev.EmailID, Status: store.EmailQueued}
		if out := a.accept(r.Context(), acceptedEmailKey(ev.EmailID), view, ev, resp); !out.ok {
			return out.status, out.body
		}
		return http.StatusAccepted, resp
	})
}

// scheduleEmail holds the email's request back until sendAt and publishes
// email.scheduled, so reads show "scheduled" until it is due. The view for
// reads is recorded last, as in accept.
//
// Without an Idempotency-Key, the held-back request is stored first: if
// either write fails, it is withdrawn before the 503, so that a retry does
// not send the email twice. If it cannot be withdrawn, the email will be
// sent: after a failed notice, that is a 202 (reads show the email as
// accepted); after a hold whose outcome is unknown, a 503 that says so.
// Under a key, both writes are first recorded with the
// key and each is made at most once by its id; a failure keeps the record,
// and a retry finishes both writes instead of holding the email back twice.
func (a *API) scheduleEmail(ctx context.Context, ev *events.EmailRequested, sendAt time.Time) (int, any) {
	unavailable := func() (int, any) {
		return errResp(http.StatusServiceUnavailable, "unavailable", "cannot accept work right now; retry later")
	}
	sched := &events.EmailScheduled{EmailID: ev.EmailID, To: ev.To, Subject: ev.Subject, SendAt: sendAt, ScheduledAt: ev.RequestedAt}
	view := EmailView{EmailID: ev.EmailID, Status: store.EmailScheduled, To: &ev.To, Subject: &ev.Subject, SendAt: &sendAt}
	rawView, _ := json.Marshal(view)
	resp := acceptedEmail{EmailID: ev.EmailID, Status: store.EmailScheduled, SendAt: &sendAt}
	if call := idemCallFrom(ctx); call != nil {
		held, err := pendingOf(ev, ev.EmailID)
		if err != nil {
			return errResp(http.StatusInternalServerError, "internal", "internal error")
		}
		notice, err := pendingOf(sched, events.NewID())
		if err != nil {
			return errResp(http.StatusInternalServerError, "internal", "internal error")
		}
		held.DeliverAt, held.Then = &sendAt, notice
		held.ViewKey, held.View = acceptedEmailKey(ev.EmailID), rawView
		rawResp, _ := json.Marshal(resp)
		// The record and the once-markers are kept until sendAt plus
		// their usual time, as /v1/events keeps a held-back event's id:
		// send_at may lie further ahead than that time, and a retry
		// that found neither would schedule the email a second time.
		call.retainUntil = &sendAt
		if err := a.cfg.Idem.Prepare(ctx, call.key, idem.Record{Fingerprint: call.fingerprint, Owner: call.owner, Status: http.StatusAccepted, Body: rawResp, Pending: held, RetainUntil: &sendAt}); err != nil {
			if errors.Is(err, idem.ErrClaimLost) {
				out := a.claimLost(call.key)
				return out.status, out.body
			}
			a.log.Error("record prepared work", "event_type", ev.EventType(), "error", err)
			return unavailable()
		}
		call.prepared = true
		if err := a.publishPrepared(ctx, held, ev, &sendAt); err != nil {
			a.log.Error("schedule email", "email_id", ev.EmailID, "error", err)
			return unavailable()
		}
		// The email is held back and will be sent: the notice that shows it
		// as scheduled is worth a few more tries (appended once by its id)
		// before answering 503, which a retry under the key would finish.
		if err := a.retryFor(ctx, settleFor, func(ctx context.Context) error { return a.publishPrepared(ctx, notice, sched, &sendAt) }); err != nil {
			a.log.Error("schedule email: held back, but its notice is not published; a retry under the key finishes it", "email_id", ev.EmailID, "error", err)
			return unavailable()
		}
	} else {
		// withdraw takes the held-back email out again, and reports
		// whether it did, so that it will not be sent. Not finding it
		// does not say that: a send_at that passed meanwhile puts it in
		// the stream at once, and the scheduler may have moved it.
		withdraw := func() bool {
			removed, err := a.cfg.Publisher.CancelDelayed(context.WithoutCancel(ctx), events.TypeEmailRequested, ev.EmailID, sendAt)
			if err != nil {
				a.log.Error("withdraw held-back email; it may still be sent", "email_id", ev.EmailID, "error", err)
			}
			return removed
		}
		if _, err := a.cfg.Publisher.PublishAt(ctx, sendAt, ev, bus.WithID(ev.EmailID)); err != nil {
			a.log.Error("schedule email", "email_id", ev.EmailID, "error", err)
			if bus.MaybeWritten(err) && !withdraw() {
				return errResp(http.StatusServiceUnavailable, "unavailable", maybeAccepted)
			}
			return unavailable()
		}
		if _, err := a.cfg.Publisher.PublishEvent(ctx, sched); err != nil {
			if withdraw() {
				a.log.Error("schedule email", "email_id", ev.EmailID, "error", err)
				return unavailable()
			}
			// Held back, and it will be sent: accepted. Reads show it
			// from the accepted marker below until it is sent.
			a.log.Error("schedule email: held back, but its notice is not published; it will be sent, and shows as scheduled only to this api's reads until then",
				"email_id", ev.EmailID, "error", err)
		}
	}
	if err := a.cfg.Idem.Put(context.WithoutCancel(ctx), acceptedEmailKey(ev.EmailID), string(rawView), acceptedTTL); err != nil {
		a.log.Warn("record accepted email for reads", "error", err)
	}
	return http.StatusAccepted, resp
}

func (a *API) getEmail(w http.ResponseWriter, r *http.Request) {
	// A UUID may come in capitals; every key (the cache's, the accepted
	// marker's) uses the lowercase form that the api hands out.
	id := strings.ToLower(r.PathValue("email_id"))
	if !events.IsUUID(id) {
		writeError(w, http.StatusBadRequest, "malformed_id", "email_id must be a UUID")
		return
	}
	// As in getDocument, only a row read from the database is cached.
	view, err := cache.Fetch(r.Context(), a.cfg.Cache, store.EmailKey(id), a.cfg.CacheTTL,
		func(ctx context.Context) (EmailView, error) {
			ctx, cancel := context.WithTimeout(ctx, readTimeout)
			defer cancel()
			e, err := a.cfg.Reader.Email(ctx, id)
			if err != nil {
				return EmailView{}, err
			}
			return emailView(e), nil
		})
	a.respondRead(w, r, err, view, acceptedEmailKey(id), "email")
}

// jsonFingerprint is the fingerprint of a JSON body as a value: a retry
// whose client encoded the same request again, with its members in another
// order or other white space, has the same one. A body that is not JSON
// has that of its bytes. Emails were fingerprinted so before their
// fingerprint was of the decoded request; it only matches records written
// then.
func jsonFingerprint(body []byte) string {
	var v any
	if json.Unmarshal(body, &v) == nil {
		if canonical, err := json.Marshal(v); err == nil { // map keys sorted
			return fingerprint(canonical)
		}
	}
	return fingerprint(body)
}

// readJSONBody checks the content type and reads a bounded JSON body,
// answering the error itself when it returns false.
//
// The body is read under a deadline of its own, JSONBodyTimeout: the
// server's read timeout is long enough for an upload, and a client that
// trickles in a small body must not hold a handler that long. Once the body
// is read, the deadline is lifted, so that it bounds the body only: net/http
// reads the connection in the background while a request is served (to
// notice a client that goes away; from the start for a request without a
// body), and that read failing on the deadline would cancel the context of
// a request still being served.
func (a *API) readJSONBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			writeError(w, http.StatusUnsupportedMediaType, "unsupported_media_type", "send application/json")
			return nil, false
		}
	}
	rc := http.NewResponseController(w)
	// A writer that cannot set deadlines (http.ErrNotSupported) leaves the
	// server's read timeout in force, which still bounds the read.
	_ = rc.SetReadDeadline(time.Now().Add(a.cfg.JSONBodyTimeout))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, a.cfg.MaxJSONBytes))
	if err == nil {
		_ = rc.SetReadDeadline(time.Time{})
		return body, true
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		writeError(w, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("the JSON body exceeds %d bytes", a.cfg.MaxJSONBytes))
		return nil, false
	}
	if status, resp, ok := clientReadError(err, fmt.Sprintf("the body did not arrive within %s", a.cfg.JSONBodyTimeout)); ok {
		writeJSON(w, status, resp)
		return nil, false
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		// The connection ended before the body did: the client went
		// away, as when its request is cancelled. (An upload answers an
		// unexpected end with 400 bad_multipart, since there the
		// multipart parser also reports a body that lacks its closing
		// boundary; a JSON body is read whole before it is parsed, so
		// here the end can only be the connection's.)
		writeError(w, 499, "client_closed", "the client went away")
		return nil, false
	}
	writeError(w, http.StatusBadRequest, "bad_request", "cannot read the body")
	return nil, false
}

// decodeStrict decodes one JSON object with no unknown fields.
//
// goccy/go-json decodes first, several times faster (ingest decodes every
// event's envelope); if it refuses the body, encoding/json decodes it again
// into a fresh value, for errors that name the field the same way every
// time.
func decodeStrict(body []byte, v any) (int, any, bool) {
	fast := fastjson.NewDecoder(bytes.NewReader(body))
	fast.DisallowUnknownFields()
	if err := fast.Decode(v); err == nil && onlySpaceAfter(body, fast.InputOffset()) {
		return 0, nil, true
	}
	reflect.ValueOf(v).Elem().SetZero()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &te) && te.Field == "":
			// The body itself is an array, a string...: there is no
			// field to name.
			st, resp := errResp(http.StatusBadRequest, "malformed_json", "the body must be a JSON object")
			return st, resp, false
		case errors.As(err, &te):
			msg := "has the wrong JSON type: want " + te.Type.String()
			if te.Type == timeType {
				msg = "must be an RFC 3339 time"
			}
			st, resp := validationResp(te.Field, msg)
			return st, resp, false
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			// The name is the client's input: clipped, so that a 500 KB
			// one does not come back whole.
			field := events.Clip(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`))
			st, resp := validationResp(field, "is not a known field")
			return st, resp, false
		default:
			st, resp := errResp(http.StatusBadRequest, "malformed_json", "the body is not valid JSON: "+err.Error())
			return st, resp, false
		}
	}
	if !onlySpaceAfter(body, dec.InputOffset()) {
		st, resp := errResp(http.StatusBadRequest, "malformed_json", "the body must hold one JSON object")
		return st, resp, false
	}
	return 0, nil, true
}

// onlySpaceAfter reports whether body holds nothing but JSON white space
// from offset on. A decoder's More does not do: it reports false before a
// stray '}' or ']'.
func onlySpaceAfter(body []byte, offset int64) bool {
	if offset < 0 || offset > int64(len(body)) {
		return false
	}
	return len(bytes.TrimLeft(body[offset:], " \t\r\n")) == 0
}

// locationOf derives the Location header of an accepted resource.
func locationOf(body []byte) string {
	var ids struct {
		DocID   string `json:"doc_id"`
		EmailID string `json:"email_id"`
	}
	if json.Unmarshal(body, &ids) != nil {
		return ""
	}
	switch {
	case ids.DocID != "":
		return "/v1/documents/" + ids.DocID
	case ids.EmailID != "":
		return "/v1/emails/" + ids.EmailID
	}
	return ""
}
