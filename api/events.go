package api

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// externalTypes are the event types other services may publish over HTTP.
// The others are facts only Conveyor's own roles establish.
var externalTypes = map[string]bool{
	events.TypeEmailRequested: true,
}

type eventRequest struct {
	Type string          `json:"type"`
	ID   string          `json:"id,omitempty"`
	Data json.RawMessage `json:"data"`
	// DeliverAt (RFC 3339) or Delay (a Go duration such as "90s") holds
	// the event back; a time in the past publishes at once.
	DeliverAt *jsonTime `json:"deliver_at,omitempty"`
	Delay     string    `json:"delay,omitempty"`
}

// jsonTime is a time.Time that reports a value it cannot parse as a JSON
// type error, which the decoder annotates with the field's name, so that
// decodeStrict answers 422 naming the field rather than "not valid JSON".
type jsonTime struct{ time.Time }

var timeType = reflect.TypeFor[time.Time]()

// UnmarshalJSON implements json.Unmarshaler.
func (t *jsonTime) UnmarshalJSON(b []byte) error {
	if err := t.Time.UnmarshalJSON(b); err != nil {
		return &json.UnmarshalTypeError{Value: "a value that is not an RFC 3339 time", Type: timeType}
	}
	return nil
}

type acceptedEvent struct {
	EventID   string     `json:"event_id"`
	Duplicate bool       `json:"duplicate,omitempty"`
	DeliverAt *time.Time `json:"deliver_at,omitempty"`
}

// dueTime returns when the event is to be delivered: zero for now.
func dueTime(req eventRequest, now time.Time, maxDelay time.Duration) (time.Time, int, any) {
	var due time.Time
	switch {
	case req.DeliverAt != nil && req.Delay != "":
		st, body := validationResp("delay", "give deliver_at or delay, not both")
		return due, st, body
	case req.DeliverAt != nil:
		due = req.DeliverAt.Time
	case req.Delay != "":
		d, err := time.ParseDuration(req.Delay)
		if err != nil {
			st, body := validationResp("delay", "must be a duration such as 90s or 2h30m")
			return due, st, body
		}
		if d < 0 {
			// Most likely a sign error on the client's side: refuse it
			// rather than publish at once what was meant for later.
			st, body := validationResp("delay", "must not be negative")
			return due, st, body
		}
		due = now.Add(d)
	}
	if !due.After(now) {
		return time.Time{}, 0, nil
	}
	if due.After(now.Add(maxDelay)) {
		field := "deliver_at"
		if req.Delay != "" {
			field = "delay"
		}
		st, body := validationResp(field, fmt.Sprintf("must be at most %s ahead", humanDuration(maxDelay)))
		return due, st, body
	}
	return due.UTC(), 0, nil
}

// eventIDTTL is how long a client-chosen event id is remembered after the
// event is delivered.
const eventIDTTL = 7 * 24 * time.Hour

// onceOption publishes an event with a client-chosen id once. The marker
// outlives the delivery time by eventIDTTL: an event held back for up to
// MaxDelay would otherwise forget its id before it is even delivered, and
// a retry then would publish it a second time.
func onceOption(due, now time.Time) bus.PublishOption {
	ttl := eventIDTTL
	if due.After(now) {
		ttl += due.Sub(now)
	}
	return bus.WithOnce(ttl)
}

// resultID is the event_id of a refused member of a batch: the client's id
// in the canonical form an accepted member's has (lower case), or none if
// it is not a UUID (it names no event, and it is the client's input of any
// length).
func resultID(id string) string {
	if !events.IsUUID(id) {
		return ""
	}
	return strings.ToLower(id)
}

// parseEvent checks one upstream event; it returns the response on failure.
func parseEvent(req eventRequest) (events.Event, string, int, any) {
	if req.Type == "" {
		st, body := validationResp("type", "is required")
		return nil, "", st, body
	}
	if !externalTypes[req.Type] {
		if _, known := events.Lookup(req.Type, events.LatestVersion(req.Type)); known {
			st, body := errResp(http.StatusBadRequest, "event_type_not_accepted",
				fmt.Sprintf("event type %q is published by Conveyor itself, not accepted from outside", req.Type))
			return nil, "", st, body
		}
		st, body := errResp(http.StatusBadRequest, "unknown_event_type", fmt.Sprintf("unknown event type %q", events.Clip(req.Type)))
		return nil, "", st, body
	}
	if req.ID != "" && !events.IsUUID(req.ID) {
		st, body := validationResp("id", "must be a UUID")
		return nil, "", st, body
	}
	if len(req.Data) == 0 {
		st, body := validationResp("data", "is required")
		return nil, "", st, body
	}
	// Strict: a member the event does not have is a mistake the client
	// must hear of, not a field to drop (an unknown "send_at" would send
	// the email at once).
	ev, err := events.DecodeStrict(req.Type, 0, req.Data)
	if err != nil {
		var ve *events.ValidationError
		if errors.As(err, &ve) {
			for i := range ve.Fields {
				// events.Decode already names the payload as a whole
				// "data" (it is not an object, say).
				if ve.Fields[i].Field != "data" {
					ve.Fields[i].Field = "data." + ve.Fields[i].Field
				}
			}
			return nil, "", http.StatusUnprocessableEntity, errorBody{Error: errorDetail{Code: "validation_failed", Message: ve.Error(), Fields: ve.Fields}}
		}
		st, body := errResp(http.StatusBadRequest, "bad_event", err.Error())
		return nil, "", st, body
	}
	// UUIDs are case-insensitive: one canonical form keeps "A…" and "a…" one id.
	id := strings.ToLower(req.ID)
	if id == "" {
		id = events.NewID()
	}
	return ev, id, 0, nil
}

func (a *API) postEvent(w http.ResponseWriter, r *http.Request) {
	body, ok := a.readJSONBody(w, r)
	if !ok {
		return
	}
	var req eventRequest
	if status, resp, ok := decodeStrict(body, &req); !ok {
		writeJSON(w, status, resp)
		return
	}
	ev, id, status, resp := parseEvent(req)
	if ev == nil {
		writeJSON(w, status, resp)
		return
	}
	now := time.Now()
	due, status, resp := dueTime(req, now, a.cfg.MaxDelay)
	if status != 0 {
		writeJSON(w, status, resp)
		return
	}
	ctx := r.Context()
	// A client-chosen id publishes once: the check of the id and the
	// append are one atomic step in Redis, so an outage in between can
	// neither lose the event nor leave a mark that claims it.
	opts := []bus.PublishOption{bus.WithID(id)}
	if req.ID != "" {
		opts = append(opts, onceOption(due, now))
	}
	var err error
	if due.IsZero() {
		_, err = a.cfg.Publisher.PublishEvent(ctx, ev, opts...)
	} else {
		_, err = a.cfg.Publisher.PublishAt(ctx, due, ev, opts...)
	}
	if errors.Is(err, bus.ErrAlreadyPublished) {
		writeJSON(w, http.StatusAccepted, acceptedEvent{EventID: id, Duplicate: true})
		return
	}
	if err != nil {
		a.log.Error("publish event", "event_type", req.Type, "event_id", id, "error", err)
		writeError(w, http.StatusServiceUnavailable, "unavailable", unpublished(err, req.ID != ""))
		return
	}
	res := acceptedEvent{EventID: id}
	if !due.IsZero() {
		res.DeliverAt = &due
	}
	writeJSON(w, http.StatusAccepted, res)
}

// errNotAttempted marks the held-back events of a batch that were not tried
// after an earlier one failed; it wraps that failure.
var errNotAttempted = errors.New("not attempted")

// unpublished says what became of an event whose publish failed with err,
// and whether sending it again is safe: a write cut off mid-way may have
// been appended, and only an event with its own id is appended once.
func unpublished(err error, ownID bool) string {
	switch {
	case errors.Is(err, errNotAttempted):
		return "not published, since an earlier held-back event of the batch failed; send it again"
	case !bus.MaybeWritten(err):
		return "not published; send it again"
	case ownID:
		return "may have been published; send it again with the same id, which publishes it once"
	default:
		return `may have been published; sending it again may publish it twice (give events an "id" to publish them once)`
	}
}

type batchRequest struct {
	// Events are decoded one by one, so a malformed member fails only
	// itself.
	Events []json.RawMessage `json:"events"`
}

// BatchResult is the outcome of one event of a batch.
type BatchResult struct {
	EventID string `json:"event_id,omitempty"`
	Status  int    `json:"status"`
	// DeliverAt is set, as POST /v1/events sets it, when this request
	// held the event back.
	DeliverAt *time.Time   `json:"deliver_at,omitempty"`
	Error     *errorDetail `json:"error,omitempty"`
}

type batchResponse struct {
	Accepted int           `json:"accepted"`
	Rejected int           `json:"rejected"`
	Results  []BatchResult `json:"results"`
}

// postEventBatch accepts up to MaxBatch events at once. Each event stands
// alone: every result with status 202 is durable, the others were not
// published (and may be sent again).
func (a *API) postEventBatch(w http.ResponseWriter, r *http.Request) {
	body, ok := a.readJSONBody(w, r)
	if !ok {
		return
	}
	var req batchRequest
	if status, resp, ok := decodeStrict(body, &req); !ok {
		writeJSON(w, status, resp)
		return
	}
	if len(req.Events) == 0 {
		st, b := validationResp("events", "must hold at least one event")
		writeJSON(w, st, b)
		return
	}
	if len(req.Events) > a.cfg.MaxBatch {
		st, b := validationResp("events", fmt.Sprintf("must hold at most %d events", a.cfg.MaxBatch))
		writeJSON(w, st, b)
		return
	}
	ctx := r.Context()
	results := make([]BatchResult, len(req.Events))
	var pubEvs []events.Event
	var pubOpts [][]bus.PublishOption
	var pubIdx []int
	now := time.Now()
	dues := make([]time.Time, len(req.Events))
	parsed := make([]eventRequest, len(req.Events))
	for i, raw := range req.Events {
		if status, resp, ok := decodeStrict(raw, &parsed[i]); !ok {
			eb := resp.(errorBody)
			results[i] = BatchResult{Status: status, Error: &eb.Error}
			continue
		}
		er := parsed[i]
		ev, id, status, resp := parseEvent(er)
		if ev == nil {
			eb := resp.(errorBody)
			results[i] = BatchResult{EventID: resultID(er.ID), Status: status, Error: &eb.Error}
			continue
		}
		due, status, resp := dueTime(er, now, a.cfg.MaxDelay)
		if status != 0 {
			eb := resp.(errorBody)
			results[i] = BatchResult{EventID: resultID(er.ID), Status: status, Error: &eb.Error}
			continue
		}
		dues[i] = due
		results[i] = BatchResult{EventID: id, Status: http.StatusAccepted}
		pubEvs = append(pubEvs, ev)
		opts := []bus.PublishOption{bus.WithID(id)}
		if er.ID != "" {
			opts = append(opts, onceOption(due, now))
		}
		pubOpts = append(pubOpts, opts)
		pubIdx = append(pubIdx, i)
	}
	// A client-chosen id is published once, even across batches: each such
	// event is appended only if its id is new, atomically (WithOnce). A
	// repeat within this batch gets the outcome of its first copy, so it is
	// never reported durable when the first copy failed.
	sameAs := map[int]int{}
	{
		first := map[string]int{}
		var evs []events.Event
		var opts [][]bus.PublishOption
		var idx []int
		for k, i := range pubIdx {
			if id := results[i].EventID; parsed[i].ID != "" {
				if j, ok := first[id]; ok {
					sameAs[i] = j
					continue
				}
				first[id] = i
			}
			evs, opts, idx = append(evs, pubEvs[k]), append(opts, pubOpts[k]), append(idx, i)
		}
		pubEvs, pubOpts, pubIdx = evs, opts, idx
	}
	// Held-back events go to their delay set one by one; the rest share
	// pipelined writes. After a held-back event failed, the others are not
	// tried: against a Redis that hangs, each would wait out the client's
	// timeouts in turn, and a batch of 1,000 would outlast the request.
	var nowEvs []events.Event
	var nowOpts [][]bus.PublishOption
	var nowIdx []int
	var outcomes []error
	var outIdx []int
	var stopped error
	for k, i := range pubIdx {
		if dues[i].IsZero() {
			nowEvs, nowOpts, nowIdx = append(nowEvs, pubEvs[k]), append(nowOpts, pubOpts[k]), append(nowIdx, i)
			continue
		}
		err := stopped
		if err == nil {
			_, err = a.cfg.Publisher.PublishAt(ctx, dues[i], pubEvs[k], pubOpts[k]...)
			if err != nil && !errors.Is(err, bus.ErrAlreadyPublished) {
				stopped = fmt.Errorf("%w: %w", errNotAttempted, err)
			}
		}
		outcomes, outIdx = append(outcomes, err), append(outIdx, i)
	}
	for k, res := range a.cfg.Publisher.PublishBatch(ctx, nowEvs, nowOpts) {
		outcomes, outIdx = append(outcomes, res.Err), append(outIdx, nowIdx[k])
	}
	var failed []string // ids of the events not published
	var firstErr error
	for k, err := range outcomes {
		i := outIdx[k]
		if err == nil && !dues[i].IsZero() {
			// Held back by this request; an id published before
			// (ErrAlreadyPublished) is answered without it, as the
			// duplicate of POST /v1/events is.
			results[i].DeliverAt = &dues[i]
		}
		if err != nil && !errors.Is(err, bus.ErrAlreadyPublished) {
			failed = append(failed, results[i].EventID)
			firstErr = cmp.Or(firstErr, err)
			results[i].Status = http.StatusServiceUnavailable
			results[i].Error = &errorDetail{Code: "unavailable", Message: unpublished(err, parsed[i].ID != "")}
		}
	}
	if len(failed) > 0 {
		// One line per batch, not per event: a Redis outage fails them all.
		a.log.Error("publish events of a batch", "failed", len(failed), "of", len(outcomes), "event_ids", failed[:min(len(failed), 10)], "error", firstErr)
	}
	for i, j := range sameAs {
		// The whole result (status, error, deliver_at): a copy answered
		// with less, say without the deliver_at its event is held back
		// until, would contradict its first copy about the one event.
		results[i] = results[j]
	}
	resp := batchResponse{Results: results}
	for _, res := range results {
		if res.Status == http.StatusAccepted {
			resp.Accepted++
		} else {
			resp.Rejected++
		}
	}
	writeJSON(w, http.StatusOK, resp)
}
