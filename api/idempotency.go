package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
)

// idemCall is the Idempotency-Key of the request being served, handed to
// accept through the context.
type idemCall struct {
	key, fingerprint string
	// owner is the claim's token, which every write of the record names.
	owner string
	// bodyFingerprint is set by an operation whose fingerprint is known
	// once it read the body (see idempotent's verify).
	bodyFingerprint string
	// prepared is set once the record names the event to publish: from
	// then on the key is kept even if the request fails.
	prepared bool
	// retainUntil is set by an operation whose work is held back until
	// then: its record is kept that much longer (idem.Record.RetainUntil).
	retainUntil *time.Time
}

type idemCallKey struct{}

func idemCallFrom(ctx context.Context) *idemCall {
	c, _ := ctx.Value(idemCallKey{}).(*idemCall)
	return c
}

// idempotent runs op at most once per Idempotency-Key header value. The
// first request runs op; its response is stored (if 2xx) and replayed to
// later requests with the same key. A key reused with a different request
// gets 422: a request is the same if its fingerprint is one of those
// fingerprints returns (the first is recorded; the others are earlier forms
// of it, which records written before may hold); it runs only for a request
// with a key.
//
// Accepting work ends in a publish whose outcome can be unknown (Redis
// went away mid-write). So before publishing, accept records the event
// under the key; a retry that finds such a record publishes the same event
// again, which appends it only if it was not appended before, and answers
// as the first request would have. A request arriving while the first has
// not yet got that far gets 409. Without the header, op just runs.
//
// A request whose fingerprint is known only once its body is read (an
// upload, streamed into storage) also passes verify: op sets the body's
// fingerprint (idemCall.bodyFingerprint), which is recorded, and a later
// request with the key has verify read its body and compare it with the
// recorded one (want), or gets verify's error response (keyReused if they
// differ). pending says the later request will finish the prepared first
// one.
func (a *API) idempotent(w http.ResponseWriter, r *http.Request, scope string, fingerprints func() []string, verify func(r *http.Request, want string, pending bool) (int, any), op func(*http.Request) (int, any)) {
	keys := r.Header.Values("Idempotency-Key")
	if len(keys) > 1 || len(keys) == 1 && strings.TrimSpace(keys[0]) == "" {
		// A client that sends the header means to be safe to retry; an
		// empty or repeated one would silently make it unsafe.
		writeError(w, http.StatusBadRequest, "bad_idempotency_key", "send one Idempotency-Key, not empty")
		return
	}
	key := r.Header.Get("Idempotency-Key")
	if key == "" {
		status, body := op(r)
		raw, _ := json.Marshal(body)
		writeResult(w, status, raw)
		return
	}
	if len(key) > 255 {
		writeError(w, http.StatusBadRequest, "bad_idempotency_key", "Idempotency-Key must be at most 255 characters")
		return
	}
	fps := fingerprints()
	fp := fps[0]
	rkey := "key:" + scope + ":" + key
	rec, claimed, err := a.cfg.Idem.Claim(r.Context(), rkey, fp, a.cfg.IdempotencyLease)
	if err != nil {
		a.log.Error("claim idempotency key", "error", err)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "cannot accept work right now; retry later")
		return
	}
	if !claimed {
		if !slices.Contains(fps, rec.Fingerprint) {
			status, resp := keyReused()
			writeJSON(w, status, resp)
			return
		}
		if verify != nil && rec.BodyFingerprint != "" && (rec.Done || rec.Pending != nil) {
			if status, resp := verify(r, rec.BodyFingerprint, !rec.Done); status != 0 {
				writeJSON(w, status, resp)
				return
			}
		}
		switch {
		case rec.Done:
			writeReplay(w, rec)
		case rec.Pending != nil:
			a.finishPending(w, r, rkey, rec)
		default:
			writeError(w, http.StatusConflict, "request_in_progress", "a request with this Idempotency-Key is still in progress")
		}
		return
	}
	call := &idemCall{key: rkey, fingerprint: fp, owner: rec.Owner}
	stopKeeping := a.keepClaim(r.Context(), call)
	status, body := func() (int, any) {
		// Deferred: a panicking op must not leave the claim kept forever.
		defer stopKeeping()
		return op(r.WithContext(context.WithValue(r.Context(), idemCallKey{}, call)))
	}()
	raw, _ := json.Marshal(body)
	bg := context.WithoutCancel(r.Context())
	switch {
	case status >= 200 && status < 300:
		if err := a.cfg.Idem.Complete(bg, rkey, idem.Record{Fingerprint: fp, BodyFingerprint: call.bodyFingerprint, Owner: call.owner, Status: status, Body: raw, RetainUntil: call.retainUntil}); err != nil {
			// A prepared record still answers retries correctly.
			a.log.Error("store idempotent response", "error", err)
		}
	case call.prepared:
		// The event may have been published: the record stays, and a
		// retry finishes the request.
	default:
		if err := a.cfg.Idem.Release(bg, rkey, call.owner); err != nil {
			a.log.Error("release idempotency key", "error", err)
		}
	}
	writeResult(w, status, raw)
}

// keepClaim extends call's claim every third of its lease until the returned
// stop is called (which waits for it to stop), so that a request slower
// than the lease keeps its key. Once the claim is lost (the request was
// stalled past the lease and another request claimed the key), it stops:
// Prepare then refuses, and this request publishes nothing.
func (a *API) keepClaim(ctx context.Context, call *idemCall) (stop func()) {
	lease := a.cfg.IdempotencyLease
	return idem.Renew(ctx, lease/3,
		func(ctx context.Context) error { return a.cfg.Idem.Keep(ctx, call.key, call.owner, lease) },
		func(err error) {
			if errors.Is(err, idem.ErrClaimLost) {
				a.log.Warn("idempotency key claim lost while its request ran; the request will not publish", "key", call.key)
			} else {
				a.log.Warn("extend idempotency key claim; trying again", "key", call.key, "error", err)
			}
		})
}

// claimLost answers a request whose claim of its Idempotency-Key was lost
// before it recorded its work: another request with the key now does it.
func (a *API) claimLost(key string) acceptOutcome {
	a.log.Warn("idempotency key claimed by another request before this one recorded its work; not published", "key", key)
	return acceptOutcome{status: http.StatusConflict, body: errBody("request_in_progress", "a request with this Idempotency-Key is still in progress")}
}

// finishPending answers a retry of a request that prepared its event: it
// publishes that event again (appended only if the first publish did not
// happen), records the view for reads, and replays the first request's
// response.
func (a *API) finishPending(w http.ResponseWriter, r *http.Request, rkey string, rec idem.Record) {
	p := rec.Pending
	if rec.RetainUntil == nil {
		// Written before records kept held-back work longer.
		rec.RetainUntil = p.DeliverAt
	}
	ctx := r.Context()
	for q := p; q != nil; q = q.Then {
		ev, err := events.Decode(q.EventType, 0, q.Payload)
		if err != nil {
			a.log.Error("idempotency record holds an event that does not decode", "key", rkey, "event_type", q.EventType, "error", err)
			writeError(w, http.StatusInternalServerError, "internal", "internal error")
			return
		}
		if err := a.publishPrepared(ctx, q, ev, rec.RetainUntil); err != nil {
			a.log.Error("publish prepared work", "event_type", q.EventType, "event_id", q.EventID, "error", err)
			writeError(w, http.StatusServiceUnavailable, "unavailable", "cannot accept work right now; retry later")
			return
		}
	}
	bg := context.WithoutCancel(ctx)
	if p.ViewKey != "" {
		if err := a.cfg.Idem.Put(bg, p.ViewKey, string(p.View), acceptedTTL); err != nil {
			a.log.Warn("record accepted work for reads; it is accepted, reads may miss it until it is projected", "error", err)
		}
	}
	if err := a.cfg.Idem.Complete(bg, rkey, rec); err != nil {
		a.log.Error("store idempotent response", "error", err)
	}
	writeReplay(w, rec)
}

// publishPrepared publishes (or holds back until p.DeliverAt) the prepared
// event ev, at most once by its id: a publish that happened before counts
// as done. The id is remembered as long as the record that names it is
// kept (see idem.Record.RetainUntil, given as retainUntil), and at least
// eventIDTTL after its delivery: a retry that finds the record must not
// find the id forgotten, and publish the event a second time.
func (a *API) publishPrepared(ctx context.Context, p *idem.Pending, ev events.Event, retainUntil *time.Time) error {
	var until time.Time // the later of retainUntil and p.DeliverAt
	if retainUntil != nil {
		until = *retainUntil
	}
	if p.DeliverAt != nil && p.DeliverAt.After(until) {
		until = *p.DeliverAt
	}
	opts := []bus.PublishOption{bus.WithID(p.EventID), onceOption(until, time.Now())}
	var err error
	if p.DeliverAt != nil {
		_, err = a.cfg.Publisher.PublishAt(ctx, *p.DeliverAt, ev, opts...)
	} else {
		_, err = a.cfg.Publisher.PublishEvent(ctx, ev, opts...)
	}
	if errors.Is(err, bus.ErrAlreadyPublished) {
		return nil
	}
	return err
}

// pendingOf describes ev for an idempotency record.
func pendingOf(ev events.Event, id string) (*idem.Pending, error) {
	payload, err := json.Marshal(ev)
	if err != nil {
		return nil, err
	}
	return &idem.Pending{EventType: ev.EventType(), EventID: id, Payload: payload}, nil
}

// acceptOutcome is how accepting work went.
type acceptOutcome struct {
	ok     bool
	status int
	body   any
	// maybePublished is set on a failure after which the event may still
	// be in its stream, or may still be published by a retry under the
	// same Idempotency-Key, so what it refers to must be kept.
	maybePublished bool
}

// accept publishes the event of accepted work, then remembers its initial
// view, which answers reads until the projector has written the row (read
// your own write). In that order, a failure can never leave a record of
// work that was not accepted; if Redis fails between the two, the work is
// accepted and a read may miss it until the projector catches up.
//
// The event is published at most once by its id (WithOnce), so that a
// failure whose outcome is unknown (a connection lost mid-write) can be
// settled by asking Redis whether the id was appended: if it was, the work
// is accepted after all. Under an Idempotency-Key, the event, the view and
// resp (the response on success) are also recorded under the key before
// publishing, so that a retry after an outcome that stayed unknown
// finishes this request instead of accepting the work a second time.
func (a *API) accept(ctx context.Context, viewKey string, view any, ev events.Event, resp any) (out acceptOutcome) {
	unavailable := acceptOutcome{status: http.StatusServiceUnavailable, body: errBody("unavailable", "cannot accept work right now; retry later")}
	if idemCallFrom(ctx) == nil {
		defer func() {
			// No key finishes this request on a retry: the client must
			// know that a retry may do the work twice.
			if out.maybePublished {
				out.body = errBody("unavailable", maybeAccepted)
			}
		}()
	}
	rawView, err := json.Marshal(view)
	if err != nil {
		return acceptOutcome{status: http.StatusInternalServerError, body: errBody("internal", "internal error")}
	}
	id := events.NewID()
	markTTL := acceptedTTL
	if call := idemCallFrom(ctx); call != nil {
		// Once the record is prepared, a retry under the key can publish
		// its event whatever happens here, so whatever the event refers
		// to is kept on every failure (blob retention removes bytes no
		// document ever referred to).
		defer func() {
			if !out.ok && call.prepared {
				out.maybePublished = true
			}
		}()
		pending, err := pendingOf(ev, id)
		if err != nil {
			return acceptOutcome{status: http.StatusInternalServerError, body: errBody("internal", "internal error")}
		}
		pending.ViewKey, pending.View = viewKey, rawView
		rawResp, _ := json.Marshal(resp)
		rec := idem.Record{Fingerprint: call.fingerprint, BodyFingerprint: call.bodyFingerprint, Owner: call.owner, Status: http.StatusAccepted, Body: rawResp, Pending: pending}
		if err := a.cfg.Idem.Prepare(ctx, call.key, rec); err != nil {
			if errors.Is(err, idem.ErrClaimLost) {
				return a.claimLost(call.key)
			}
			a.log.Error("record prepared work", "event_type", ev.EventType(), "error", err)
			// The record may have been written all the same (the Redis
			// client retries a command whose connection broke), and if the
			// release of the key fails as well, a retry under the key
			// publishes its event: keep what the event refers to.
			unavailable.maybePublished = bus.MaybeWritten(err)
			return unavailable
		}
		call.prepared = true
		markTTL = eventIDTTL // as long as the record a retry finishes
	}
	_, err = a.cfg.Publisher.PublishEvent(ctx, ev, bus.WithID(id), bus.WithOnce(markTTL))
	if err != nil && !errors.Is(err, bus.ErrAlreadyPublished) {
		if !bus.MaybeWritten(err) {
			a.log.Error("publish accepted work", "event_type", ev.EventType(), "error", err)
			return unavailable
		}
		published, known := a.settle(ctx, ev.EventType(), id)
		if !published {
			if known {
				a.log.Error("publish accepted work", "event_type", ev.EventType(), "error", err)
			} else {
				a.log.Error("publish accepted work; whether the event was appended is unknown", "event_type", ev.EventType(), "event_id", id, "error", err)
			}
			unavailable.maybePublished = !known
			return unavailable
		}
		a.log.Warn("publish reported an error, but the event was appended", "event_type", ev.EventType(), "event_id", id, "error", err)
	}
	if err := a.cfg.Idem.Put(context.WithoutCancel(ctx), viewKey, string(rawView), acceptedTTL); err != nil {
		a.log.Warn("record accepted work for reads; it is accepted, reads may miss it until it is projected", "error", err)
	}
	return acceptOutcome{ok: true}
}

// maybeAccepted is the message of a 503 after which the work may have been
// accepted after all, for a request without an Idempotency-Key.
const maybeAccepted = "may have been accepted; sending it again may do the work twice (send an Idempotency-Key, and a retry with it finishes this request instead)"

// settleFor bounds how long accept keeps asking Redis, after a publish
// whose outcome is unknown, whether the event was appended.
const settleFor = 3 * time.Second

// settle asks Redis whether the event id was appended, for at most
// settleFor. known is false if Redis did not answer in that time.
func (a *API) settle(ctx context.Context, eventType, id string) (published, known bool) {
	err := a.retryFor(ctx, settleFor, func(ctx context.Context) (err error) {
		published, err = a.cfg.Publisher.Published(ctx, eventType, id)
		return err
	})
	return published, err == nil
}

// retryFor runs op until it succeeds, for at most d, even if the request
// is cancelled meanwhile (what op finishes was already accepted). It
// returns op's last error.
func (a *API) retryFor(ctx context.Context, d time.Duration, op func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d)
	defer cancel()
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		err := op(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
	}
}

// keyReused is the answer to a request whose Idempotency-Key was used with
// another request.
func keyReused() (int, any) {
	return errResp(http.StatusUnprocessableEntity, "idempotency_key_reused", "this Idempotency-Key was used with a different request")
}

// writeResult writes a handler's JSON result, with a Location header for
// an accepted resource.
func writeResult(w http.ResponseWriter, status int, raw []byte) {
	if loc := locationOf(raw); loc != "" && status == http.StatusAccepted {
		w.Header().Set("Location", loc)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(raw, '\n'))
}

// writeReplay writes a stored response again.
func writeReplay(w http.ResponseWriter, rec idem.Record) {
	w.Header().Set("Idempotent-Replayed", "true")
	w.Header().Set("Content-Type", "application/json")
	if loc := locationOf(rec.Body); loc != "" {
		w.Header().Set("Location", loc)
	}
	w.WriteHeader(rec.Status)
	_, _ = w.Write(rec.Body)
}
