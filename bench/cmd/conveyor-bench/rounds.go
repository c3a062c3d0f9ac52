package main

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
)

// combineRounds makes one line of each measurement out of its lines in
// every round (matched by description, in the order they first appear).
//
// The value is the median of the rounds, or the highest for a worst
// line; the notes are those of the round the value comes from (for an
// even number of rounds, the lower of the two middle ones), followed by
// every round's figure. The ratio is the median of the per-round ratios,
// each against the baseline of its own round, so a machine whose speed
// drifts between rounds moves a row and its baseline together. A
// measurement missing from a round (its row failed there: the failure
// has a line of its own) is combined from the rounds that have it.
func combineRounds(rounds [][]line) []line {
	type member struct {
		l     line
		round int
	}
	var order []string
	groups := map[string][]member{}
	for r, ls := range rounds {
		for _, l := range ls {
			if _, ok := groups[l.what]; !ok {
				order = append(order, l.what)
			}
			groups[l.what] = append(groups[l.what], member{l, r})
		}
	}
	out := make([]line, 0, len(order))
	for _, what := range order {
		ms := groups[what]
		if ms[0].l.err != nil {
			// A failure: one line per round it happened in.
			for _, m := range ms {
				l := m.l
				l.notes = fmt.Sprintf("round %d of %d: %s", m.round+1, len(rounds), l.notes)
				out = append(out, l)
			}
			continue
		}
		byValue := slices.Clone(ms)
		slices.SortStableFunc(byValue, func(a, b member) int { return cmp.Compare(a.l.value, b.l.value) })
		values := make([]float64, len(ms))
		for i, m := range byValue {
			values[i] = m.l.value
		}
		rep := byValue[(len(byValue)-1)/2]
		if rep.l.worst {
			rep = byValue[len(byValue)-1]
		}
		l := rep.l
		if !l.worst {
			l.value = median(values)
		}
		var ratios, bases []float64
		for _, m := range ms {
			if m.l.baseValue > 0 {
				ratios = append(ratios, m.l.value/m.l.baseValue)
				bases = append(bases, m.l.baseValue)
			}
		}
		slices.Sort(ratios)
		slices.Sort(bases)
		l.combined, l.roundRatio, l.baseValue = true, median(ratios), median(bases)
		var each []string
		for _, m := range ms {
			s := fmt.Sprintf("%d: %s", m.round+1, formatValue(m.l.value, m.l.unit))
			if m.l.baseValue > 0 {
				s += fmt.Sprintf(" (%.2f×)", m.l.value/m.l.baseValue)
			}
			each = append(each, s)
		}
		which := "median"
		if l.worst {
			which = "worst"
		}
		summary := fmt.Sprintf("rounds %s (notes of round %d, the %s)", strings.Join(each, ", "), rep.round+1, which)
		if len(ms) < len(rounds) {
			summary += fmt.Sprintf("; measured in %d of %d rounds", len(ms), len(rounds))
		}
		if l.notes == "" {
			l.notes = summary
		} else {
			l.notes += "; " + summary
		}
		out = append(out, l)
	}
	return out
}

// median of sorted values; the mean of the middle two for an even count;
// NaN for none.
func median(sorted []float64) float64 {
	n := len(sorted)
	switch {
	case n == 0:
		return math.NaN()
	case n%2 == 1:
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}
