// Package events defines Conveyor's events: past-tense Go structs with a stable
// wire name (which is also the Redis stream they travel on), a schema version,
// a JSON payload and validation.
//
// It is the shared language of the api, the handlers and the projector, so it
// imports no infrastructure: no Redis, no Watermill, no SQL. A breaking change
// to an event is a new version, never an edit of an existing one.
package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	fastjson "github.com/goccy/go-json"
)

// Event is implemented by every event struct.
type Event interface {
	// EventType returns the stable wire name, e.g. "document.uploaded". It is
	// also the name of the stream the event is published on.
	EventType() string
	// EventVersion returns the schema version of the payload.
	EventVersion() int
	// Validate reports every problem with the payload at once, as a
	// *ValidationError.
	Validate() error
}

// Wire names of the events. Each is also a stream name.
const (
	TypeDocumentUploaded         = "document.uploaded"
	TypeDocumentProcessed        = "document.processed"
	TypeDocumentProcessingFailed = "document.processing_failed"
	TypeEmailRequested           = "email.requested"
	TypeEmailScheduled           = "email.scheduled"
	TypeEmailSent                = "email.sent"
	TypeEmailFailed              = "email.failed"
)

// ErrUnknownType is returned by Decode for an event type (or version) that is
// not registered.
var ErrUnknownType = errors.New("unknown event type")

// Spec describes one registered event type and version.
type Spec struct {
	Type    string
	Version int
	// New returns a pointer to a zero value of the event struct.
	New func() Event
}

type specKey struct {
	typ     string
	version int
}

var (
	registry = map[specKey]Spec{}
	// latest is the highest registered version of each type.
	latest = map[string]int{}
)

func register(s Spec) {
	k := specKey{s.Type, s.Version}
	if _, dup := registry[k]; dup {
		panic("events: duplicate registration of " + s.Type)
	}
	registry[k] = s
	latest[s.Type] = max(latest[s.Type], s.Version)
}

func init() {
	register(Spec{TypeDocumentUploaded, 1, func() Event { return new(DocumentUploaded) }})
	register(Spec{TypeDocumentProcessed, 1, func() Event { return new(DocumentProcessed) }})
	register(Spec{TypeDocumentProcessingFailed, 1, func() Event { return new(DocumentProcessingFailed) }})
	register(Spec{TypeEmailRequested, 1, func() Event { return new(EmailRequested) }})
	register(Spec{TypeEmailScheduled, 1, func() Event { return new(EmailScheduled) }})
	register(Spec{TypeEmailSent, 1, func() Event { return new(EmailSent) }})
	register(Spec{TypeEmailFailed, 1, func() Event { return new(EmailFailed) }})
}

// Lookup returns the Spec registered for an event type and version.
func Lookup(typ string, version int) (Spec, bool) {
	s, ok := registry[specKey{typ, version}]
	return s, ok
}

// Types returns the wire names of every registered event type, sorted.
func Types() []string {
	seen := map[string]bool{}
	var out []string
	for k := range registry {
		if !seen[k.typ] {
			seen[k.typ] = true
			out = append(out, k.typ)
		}
	}
	sort.Strings(out)
	return out
}

// LatestVersion returns the highest registered version of typ, or 0.
func LatestVersion(typ string) int { return latest[typ] }

// Decode parses and validates a JSON payload of the given type and version.
// A version of 0 means the latest. Errors are ErrUnknownType, a JSON syntax
// error wrapped in a *ValidationError, or a *ValidationError naming fields.
func Decode(typ string, version int, payload []byte) (Event, error) {
	if version == 0 {
		version = LatestVersion(typ)
	}
	spec, ok := Lookup(typ, version)
	if !ok {
		return nil, fmt.Errorf("%w: %q version %d", ErrUnknownType, Clip(typ), version)
	}
	ev := spec.New()
	if err := DecodeInto(ev, payload); err != nil {
		return nil, err
	}
	return ev, nil
}

// DecodeStrict is Decode for a payload from outside Conveyor (the HTTP
// API): it also refuses a member the event does not have, naming it first
// among the problems, so that a misspelt or unsupported field ("send_at",
// "cc") is not silently dropped, and validates as ValidateIngest does.
//
// Consumers use Decode, which ignores unknown members: a consumer older
// than the producer of an event must handle it rather than dead-letter it.
// The check is a second decode by encoding/json, which only the API pays,
// so the consumers' decode is as fast as before.
func DecodeStrict(typ string, version int, payload []byte) (Event, error) {
	if version == 0 {
		version = LatestVersion(typ)
	}
	ev, err := Decode(typ, version, payload)
	if errors.Is(err, ErrUnknownType) {
		return nil, err
	}
	spec, _ := Lookup(typ, version) // known: Decode found it
	field, ok := unknownField(spec.New(), payload)
	if !ok {
		if err == nil {
			// Decode has validated it: only what ingest adds is left.
			if err = ingestLimits(ev); err != nil {
				return nil, err
			}
		}
		return ev, err
	}
	fields := []FieldError{{Field: field, Message: "is not a known field"}}
	var ve *ValidationError
	if errors.As(err, &ve) {
		fields = append(fields, ve.Fields...)
	}
	return nil, &ValidationError{Fields: fields}
}

// unknownField returns the first member of the JSON object payload that
// encoding/json would not decode into ev (a pointer to a zero event
// struct), clipped for an error message. encoding/json stops at the first
// error, so a member after a value of the wrong JSON type is not seen;
// Decode refuses such a payload anyway.
func unknownField(ev Event, payload []byte) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	err := dec.Decode(ev)
	if err == nil {
		return "", false
	}
	// encoding/json has no type for this error: its text is
	// `json: unknown field "name"`.
	quoted, ok := strings.CutPrefix(err.Error(), "json: unknown field ")
	if !ok {
		return "", false
	}
	name, uerr := strconv.Unquote(quoted)
	if uerr != nil {
		name = quoted
	}
	return Clip(name), true
}

// MaxEcho bounds how much of a value from outside Clip keeps.
const MaxEcho = 64

// Clip returns s cut to at most MaxEcho bytes, on a UTF-8 boundary and
// followed by "…" when it was cut. Error messages and field names that
// echo input go through it, so a 500 KB type or member name does not come
// back whole in the answer or in every log line.
func Clip(s string) string {
	if len(s) <= MaxEcho {
		return s
	}
	n := MaxEcho
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// DecodeInto parses payload into ev, a pointer to a zero event struct of
// the payload's type and version, and validates it: Decode without the
// lookup, for a consumer that knows which struct it wants (the bus's
// typed handlers). Errors are those of Decode but ErrUnknownType.
func DecodeInto(ev Event, payload []byte) error {
	// goccy/go-json decodes about four times faster than encoding/json,
	// and decoding is on the path of every delivery. Its errors differ,
	// so a failure is decoded again by encoding/json to name the field
	// the same way every time; failures are rare.
	if err := fastjson.Unmarshal(payload, ev); err != nil {
		t := reflect.TypeOf(ev)
		if t.Kind() != reflect.Pointer {
			return fmt.Errorf("events: decode into %T, not a pointer", ev)
		}
		if err = json.Unmarshal(payload, reflect.New(t.Elem()).Interface()); err == nil {
			err = errors.New("malformed JSON")
		}
		return &ValidationError{Fields: []FieldError{{Field: jsonErrorField(err), Message: jsonErrorMessage(err)}}}
	}
	return ev.Validate()
}

func jsonErrorField(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return te.Field
	}
	return "data"
}

func jsonErrorMessage(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("must be a JSON %s", jsonKind(te.Type.Kind().String()))
	}
	return "is not valid JSON: " + err.Error()
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "string"
	case "int", "int64", "int32", "uint", "uint64", "float64":
		return "number"
	case "bool":
		return "boolean"
	case "struct":
		// time.Time and nested objects
		return "string or object of the documented form"
	default:
		return goKind
	}
}

// FieldError is one problem with one field.
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// ValidationError lists every problem found in an event payload.
type ValidationError struct {
	Fields []FieldError
}

func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Fields))
	for i, f := range e.Fields {
		parts[i] = f.Field + ": " + f.Message
	}
	return "invalid event: " + strings.Join(parts, "; ")
}

// validator collects field errors.
type validator struct{ errs []FieldError }

func (v *validator) add(field, msg string) { v.errs = append(v.errs, FieldError{field, msg}) }

func (v *validator) required(field, value string) bool {
	if strings.TrimSpace(value) == "" {
		v.add(field, "is required")
		return false
	}
	return true
}

func (v *validator) uuid(field, value string) {
	if v.required(field, value) && !IsUUID(value) {
		v.add(field, "must be a UUID")
	}
}

func (v *validator) maxLen(field, value string, n int) {
	if len(value) > n {
		v.add(field, fmt.Sprintf("must be at most %d bytes", n))
	}
}

// time requires a time that the projector can store and format: RFC 3339
// has four-digit years, so its UTC form must fall in years 1 to 9999 (a
// time of "0001-01-01T00:00:00+01:00" is in year 0 in UTC). PostgreSQL
// would refuse the others, and the event would be dead-lettered after
// the API accepted it.
func (v *validator) time(field string, t time.Time) {
	switch y := t.UTC().Year(); {
	case t.IsZero():
		v.add(field, "is required (RFC 3339 time)")
	case y < 1 || y > 9999:
		v.add(field, "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
	}
}

func (v *validator) nonNegative(field string, n int64) {
	if n < 0 {
		v.add(field, "must not be negative")
	}
}

// count checks a count stored as a 32-bit integer.
func (v *validator) count(field string, n int64) {
	if n < 0 || n > math.MaxInt32 {
		v.add(field, fmt.Sprintf("must be between 0 and %d", math.MaxInt32))
	}
}

// text rejects NUL bytes, which PostgreSQL text cannot hold.
func (v *validator) text(field, s string) {
	if strings.IndexByte(s, 0) >= 0 {
		v.add(field, "must not contain NUL bytes")
	}
}

func (v *validator) err() error {
	if len(v.errs) == 0 {
		return nil
	}
	return &ValidationError{Fields: v.errs}
}
