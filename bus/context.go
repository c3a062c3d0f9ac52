package bus

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	segjson "github.com/segmentio/encoding/json"

	"github.com/conveyor/conveyor/events"
)

type ctxKey int

const (
	handlerKey ctxKey = iota
	traceparentKey
)

// handlerValues is what a handler's context carries, in one value (looked
// up as *handlerValues).
type handlerValues struct {
	env      events.Envelope
	attempts attempts
}

// handlerCtx is a handler's context: its parent and the handler values in
// one allocation, where context.WithValue takes two (the context and the
// boxed values). Cancellation is the parent's, so contexts derived from it
// attach to the parent's as they would to a context.WithValue.
type handlerCtx struct {
	context.Context
	hv handlerValues
}

func (c *handlerCtx) Value(key any) any {
	if key == handlerKey {
		return &c.hv
	}
	return c.Context.Value(key)
}

// EnvelopeFrom returns the envelope of the event being handled, if ctx
// belongs to a handler call.
func EnvelopeFrom(ctx context.Context) (events.Envelope, bool) {
	if hv, ok := ctx.Value(handlerKey).(*handlerValues); ok {
		return hv.env, true
	}
	return events.Envelope{}, false
}

// WithEnvelope returns ctx carrying env, as a handler's context does. Tests
// of handlers use it to call them as the router would.
func WithEnvelope(ctx context.Context, env events.Envelope) context.Context {
	return &handlerCtx{Context: ctx, hv: handlerValues{env: env, attempts: attempts{attempt: env.Attempt}}}
}

var traceparentRE = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// WithTraceparent returns ctx carrying a W3C traceparent (for example from
// an incoming HTTP request), which events published with ctx record. An
// invalid value is ignored.
func WithTraceparent(ctx context.Context, tp string) context.Context {
	if !traceparentRE.MatchString(tp) {
		return ctx
	}
	return context.WithValue(ctx, traceparentKey, tp)
}

func traceparentFrom(ctx context.Context) string {
	tp, _ := ctx.Value(traceparentKey).(string)
	return tp
}

// attempts is what a handler may know about its retry budget.
type attempts struct{ attempt, max int }

// IsLastAttempt reports whether a failure of the current handler call will
// not be retried. Handlers use it to publish a final failure event (for
// example email.failed) instead of leaving it to the dead-letter stream.
func IsLastAttempt(ctx context.Context) bool {
	hv, ok := ctx.Value(handlerKey).(*handlerValues)
	return ok && hv.attempts.max > 0 && hv.attempts.attempt >= hv.attempts.max
}

// Attempt returns the delivery attempt of the event being handled (1 for the
// first), or 0 outside a handler.
func Attempt(ctx context.Context) int {
	if hv, ok := ctx.Value(handlerKey).(*handlerValues); ok {
		return hv.attempts.attempt
	}
	return 0
}

// entryEnvelope reads the envelope of a Router delivery out of its entry,
// in one pass over the metadata pairs: a key given twice ends with its
// last value, as entryMessage.Get returns it. fallbackType is used when
// the publisher set no event_type (a plain Watermill publisher): the
// stream names the type. The error is envelope's.
func entryEnvelope(em *entryMessage, fallbackType string) (events.Envelope, error) {
	var f envelopeFields
	for i := 0; i+1 < len(em.meta); i += 2 {
		f.set(em.meta[i], em.meta[i+1])
	}
	return f.envelope(em.uuid, fallbackType)
}

// messageEnvelope reads it out of a Watermill message, as a middleware
// passes it on.
func messageEnvelope(msg *message.Message, fallbackType string) (events.Envelope, error) {
	var f envelopeFields
	for k, v := range msg.Metadata {
		f.set(k, v)
	}
	return f.envelope(msg.UUID, fallbackType)
}

// envelopeFields are the metadata values of an envelope, unparsed.
type envelopeFields struct {
	typ, correlation, causation, source, traceparent, attempt, version, occurredAt string
}

// envelope parses the fields into the envelope of the message id. Other
// fields that are malformed are left zero, but an event_version that is
// present and not a version is a permanent error (see parseVersion); the
// envelope is returned with it, without the version, for the logs.
func (f *envelopeFields) envelope(id, fallbackType string) (events.Envelope, error) {
	env := events.Envelope{
		ID:            id,
		Type:          f.typ,
		CorrelationID: f.correlation,
		CausationID:   f.causation,
		Source:        f.source,
		Traceparent:   f.traceparent,
		Attempt:       parseAttempt(f.attempt),
	}
	if env.Type == "" {
		env.Type = fallbackType
	}
	// Missing values are left zero without a parse (whose error would
	// be allocated).
	var err error
	if f.version != "" {
		env.Version, err = parseVersion(f.version)
	}
	if f.occurredAt != "" {
		if t, err := time.Parse(time.RFC3339Nano, f.occurredAt); err == nil {
			env.OccurredAt = t
		}
	}
	return env, err
}

// parseVersion reads a present event_version: decimal digits only, of a
// value of at least 1, as the Publisher writes it. Anything else ("2.0",
// "v2", " 2", "+2", "0") is a permanent error. Read as no version, such an
// entry would be decoded as the handler's own version, while its producer
// says it is some other one.
func parseVersion(s string) (int, error) {
	// Atoi alone would take a sign.
	digits := true
	for i := 0; i < len(s); i++ {
		digits = digits && '0' <= s[i] && s[i] <= '9'
	}
	n, err := strconv.Atoi(s)
	if !digits || err != nil || n < 1 {
		return 0, Permanent(fmt.Errorf("%s %q is not a version (a whole number from 1, digits only)", MetaEventVersion, events.Clip(s)))
	}
	return n, nil
}

func (f *envelopeFields) set(key, value string) {
	switch key {
	case MetaEventType:
		f.typ = value
	case MetaCorrelationID:
		f.correlation = value
	case MetaCausationID:
		f.causation = value
	case MetaSource:
		f.source = value
	case MetaTraceparent:
		f.traceparent = value
	case MetaAttempt:
		f.attempt = value
	case MetaEventVersion:
		f.version = value
	case MetaOccurredAt:
		f.occurredAt = value
	}
}

func attemptOf(em *entryMessage) int { return parseAttempt(em.Get(MetaAttempt)) }

// parseAttempt reads an attempt number: 1 when it is missing or not one.
func parseAttempt(a string) int {
	if a == "" {
		return 1 // the common case; Atoi("") would allocate an error
	}
	if n, err := strconv.Atoi(a); err == nil && n > 0 {
		return n
	}
	return 1
}

// marshalJSON encodes event payloads with segmentio/encoding's json, which
// writes the bytes encoding/json writes (TestMarshalJSONMatchesEncodingJSON)
// at about twice its speed: in the e2e profile, marshalling went from 6.1%
// of the process with encoding/json to 2.6%. Not goccy/go-json: its
// encoder has a stack frame so large that the goroutines calling it grow
// their stacks again after every collection, which cost more than its
// faster encoding saves.
//
// Unlike json.Marshal it leaves '<', '>' and '&' as they are: payloads are
// never embedded in HTML, and escaping them (\u003c) makes HTML email
// bodies and URLs with query strings up to six times their size on the
// wire and in Redis, and slower to decode.
func marshalJSON(v any) ([]byte, error) {
	buf := jsonBufs.Get().(*[]byte)
	b, err := segjson.Append((*buf)[:0], v, segjson.SortMapKeys)
	var out []byte
	if err == nil {
		out = bytes.Clone(b)
	}
	if cap(b) <= maxPooledJSON {
		*buf = b
		jsonBufs.Put(buf)
	}
	return out, err
}

var jsonBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledJSON bounds the buffers kept for reuse, so that one large
// payload does not pin its buffer.
const maxPooledJSON = 64 << 10
