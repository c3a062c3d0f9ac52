package store

import "testing"

func TestWithOneRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"postgres://u:p@127.0.0.1:5432/db", "postgres://u:p@127.0.0.1:5432/db?binary_parameters=yes"},
		{"postgres://u@h/db?sslmode=disable", "postgres://u@h/db?binary_parameters=yes&sslmode=disable"},
		{"postgresql://h/db", "postgresql://h/db?binary_parameters=yes"},
		{"host=/tmp dbname=db", "host=/tmp dbname=db binary_parameters=yes"},
		// An operator's own choice is kept.
		{"postgres://h/db?binary_parameters=no", "postgres://h/db?binary_parameters=no"},
		{"host=h binary_parameters=no", "host=h binary_parameters=no"},
	}
	for _, tt := range tests {
		if got := withOneRoundTrip(tt.in); got != tt.want {
			t.Errorf("withOneRoundTrip(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
