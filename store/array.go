package store

import (
	"database/sql/driver"
	"strings"

	"github.com/lib/pq"
)

// array passes a slice as a PostgreSQL array parameter: a []string as
// textArray, anything else as pq.Array does.
func array(v any) any {
	if s, ok := v.([]string); ok {
		return textArray(s)
	}
	return pq.Array(v)
}

// textArray is pq.StringArray with a cheaper Value: the projector passes
// every column of a batch as one array (thousands of elements a
// transaction), and pq's encoder copies each element to a new []byte and
// grows its buffer from a third of the size it needs. textArray writes the
// same text (every element quoted, '"' and '\' escaped) into one buffer of
// the right size.
type textArray []string

// Value implements driver.Valuer.
func (a textArray) Value() (driver.Value, error) {
	if a == nil {
		return nil, nil
	}
	if len(a) == 0 {
		return "{}", nil
	}
	n := 1 + len(a)*3 // braces, quotes and commas
	for _, s := range a {
		n += len(s)
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteByte('{')
	for i, s := range a {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		start := 0
		for j := 0; j < len(s); j++ {
			if c := s[j]; c == '"' || c == '\\' {
				b.WriteString(s[start:j])
				b.WriteByte('\\')
				start = j
			}
		}
		b.WriteString(s[start:])
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String(), nil
}
