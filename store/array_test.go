package store

import (
	"database/sql/driver"
	"strconv"
	"testing"

	"github.com/lib/pq"
)

// textArray must encode exactly as pq.StringArray does.
func TestTextArrayEncodesAsPQ(t *testing.T) {
	tests := [][]string{
		nil,
		{},
		{""},
		{"a"},
		{"2f1c6f0e-4b7a-4c43-9a55-0c1d5e2b7f10", "2026-12-07T09:47:27.123456789Z"},
		{`quote"inside`, `back\slash`, `both\"`, `"`, `\`, `\\""`},
		{"NULL", "null", " space ", "com,ma", "{brace}", "tab\tnew\nline", "ünïcödé ✓", "\x00"},
	}
	for _, in := range tests {
		got, err := textArray(in).Value()
		if err != nil {
			t.Fatalf("textArray(%q).Value: %v", in, err)
		}
		want, err := pq.StringArray(in).Value()
		if err != nil {
			t.Fatalf("pq.StringArray(%q).Value: %v", in, err)
		}
		if got != want {
			t.Errorf("textArray(%q).Value() = %#v, want %#v (as pq)", in, got, want)
		}
	}
	if _, ok := array([]string{"a"}).(textArray); !ok {
		t.Errorf("array([]string) is %T, want textArray", array([]string{"a"}))
	}
	if _, ok := array([]int64{1}).(driver.Valuer); !ok {
		t.Errorf("array([]int64) is %T, want a driver.Valuer", array([]int64{1}))
	}
}

func BenchmarkTextArray(b *testing.B) {
	in := make([]string, 500)
	for i := range in {
		in[i] = "2f1c6f0e-4b7a-4c43-9a55-0c1d5e2b" + strconv.Itoa(1000+i)
	}
	for _, bc := range []struct {
		name string
		v    driver.Valuer
	}{{"textArray", textArray(in)}, {"pq.StringArray", pq.StringArray(in)}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bc.v.Value(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
