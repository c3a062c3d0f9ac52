package projector

import (
	"slices"
	"testing"
)

func TestCompareFold(t *testing.T) {
	for _, tt := range []struct {
		a, b string
		sign int
	}{
		{"abc", "abc", 0}, {"ABC", "abc", 0}, {"aBc", "AbC", 0},
		{"abc", "abd", -1}, {"ABD", "abc", 1}, {"ab", "abc", -1}, {"abc", "AB", 1}, {"", "", 0},
		// Folding is ASCII only, and '_' (between 'Z' and 'a') sorts
		// after letters folded to lowercase.
		{"Z", "_", 1}, {"z", "_", 1},
	} {
		got := compareFold(tt.a, tt.b)
		if got = min(max(got, -1), 1); got != tt.sign {
			t.Errorf("compareFold(%q, %q) has sign %d, want %d", tt.a, tt.b, got, tt.sign)
		}
	}
}

// Events of one row, in any case, keep the order they came in.
func TestSortByIsStableIgnoringCase(t *testing.T) {
	type ev struct {
		id string
		n  int
	}
	evs := []ev{{"B", 1}, {"a", 2}, {"b", 3}, {"A", 4}, {"a", 5}}
	sortBy(evs, func(e ev) string { return e.id })
	var got []int
	for _, e := range evs {
		got = append(got, e.n)
	}
	if want := []int{2, 4, 5, 1, 3}; !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v", got, want)
	}
}
