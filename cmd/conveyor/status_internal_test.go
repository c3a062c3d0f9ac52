package main

import "testing"

// TestAge: status writes ages with their two largest units, "-" for none.
func TestAge(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name    string
		seconds float64
		want    string
	}{
		{name: "none", seconds: 0, want: "-"},
		{name: "under a second", seconds: 0.4, want: "<1s"},
		{name: "seconds", seconds: 45.9, want: "45s"},
		{name: "minutes", seconds: 187, want: "3m07s"},
		{name: "hours", seconds: 2*3600 + 5*60 + 59, want: "2h05m"},
		{name: "days", seconds: 3*86400 + 4*3600 + 1, want: "3d04h"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := age(tt.seconds); got != tt.want {
				t.Errorf("age(%v) = %q, want %q", tt.seconds, got, tt.want)
			}
		})
	}
}
