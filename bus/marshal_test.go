package bus

import (
	"bytes"
	"encoding/json"
	"math"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
)

// stdMarshal is what encoding/json writes with HTML escaping off, the
// reference marshalJSON must match byte for byte: consumers of the streams
// in other languages, and older replicas, read these payloads.
func stdMarshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// marshalCases are payloads with every kind of string encoding/json treats
// specially: HTML characters, control characters, quotes and backslashes,
// U+2028 and U+2029, invalid UTF-8, non-ASCII text, empty and zero fields.
func marshalCases() []any {
	at := time.Date(2026, 12, 6, 7, 8, 9, 123456789, time.FixedZone("x", 5*3600+1800))
	tricky := []string{
		"", "plain", `<p>a & b</p>`, "quote \" back \\ slash /", "tab\tnl\ncr\rnul\x00bell\x07del\x7f",
		"line\u2028para\u2029end", "bad \xff\xfe utf8 \xc3", "héllo wörld — ✓ 𝄞 日本", "\u00e9\u0301",
	}
	var out []any
	for _, s := range tricky {
		out = append(out,
			&events.EmailRequested{EmailID: events.NewID(), To: s, Subject: s, Body: s, DocID: s, RequestedAt: at},
			&events.EmailSent{EmailID: s, To: s, MessageID: s, Attempts: 3, SentAt: at.UTC()},
			&events.DocumentProcessed{DocID: s, ContentType: s, Words: -1, Lines: 1 << 40, Summary: s, ProcessedAt: at},
			map[string]string{"b": s, "a": s, s: "k", "z": ""},
		)
	}
	return append(out,
		&events.EmailRequested{}, &events.DocumentUploaded{}, &events.EmailFailed{},
		map[string]any{"n": 1.5, "m": map[string]int{"y": 2, "x": 1}, "nil": nil, "l": []string{"a", "<"}},
	)
}

// TestMarshalJSONMatchesEncodingJSON: marshalJSON writes exactly what
// encoding/json writes (without HTML escaping), for every tricky input.
func TestMarshalJSONMatchesEncodingJSON(t *testing.T) {
	for i, v := range marshalCases() {
		want, werr := stdMarshal(v)
		got, gerr := marshalJSON(v)
		if (werr != nil) != (gerr != nil) {
			t.Fatalf("case %d (%T): error %v, encoding/json's %v", i, v, gerr, werr)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("case %d (%T):\n got %s\nwant %s", i, v, got, want)
		}
	}
}

// TestMarshalJSONReturnsItsOwnBytes: the pooled buffer is not shared with
// the result, so a later marshal does not overwrite an earlier payload.
func TestMarshalJSONReturnsItsOwnBytes(t *testing.T) {
	a, err := marshalJSON(map[string]string{"k": "first"})
	if err != nil {
		t.Fatal(err)
	}
	keep := string(a)
	for range 10 {
		if _, err := marshalJSON(map[string]string{"k": "second, longer than the first"}); err != nil {
			t.Fatal(err)
		}
	}
	if string(a) != keep {
		t.Fatalf("first payload changed to %s, want %s", a, keep)
	}
}

// TestMarshalJSONError: a value JSON cannot hold is an error, not a payload.
func TestMarshalJSONError(t *testing.T) {
	if p, err := marshalJSON(map[string]any{"f": func() {}}); err == nil {
		t.Fatalf("marshalJSON(func) = %s, want an error", p)
	}
	if p, err := marshalJSON(map[string]float64{"nan": math.NaN()}); err == nil {
		t.Fatalf("marshalJSON(NaN) = %s, want an error", p)
	}
}
