// Package events defines Conveyor's events: past-tense Go structs with a stable
// wire name (which is also the Redis stream they travel on), a schema version,
// a JSON payload and validation.
//
// It is the shared language of the api, the handlers and the projector, so it
// imports no infrastructure: no Redis, no Watermill, no SQL. A breaking change
// to an event is a new version, never an edit of an existing one.
package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strings"
	"time"

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
		return nil, fmt.Errorf("%w: %q version %d", ErrUnknownType, typ, version)
	}
	ev := spec.New()
	if err := DecodeInto(ev, payload); err != nil {
		return nil, err
	}
	return ev, nil
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

func (v *validator) time(field string, t time.Time) {
	if t.IsZero() {
		v.add(field, "is required (RFC 3339 time)")
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
