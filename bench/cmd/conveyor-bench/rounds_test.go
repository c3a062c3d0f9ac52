package main

import (
	"errors"
	"math"
	"strings"
	"testing"
)

// roundLines returns one round's lines: a baseline and a row judged
// against it, a latency tail and, unless failed, nothing else.
func roundLines(base, subject, tail float64) []line {
	b := line{key: "base", what: "1. baseline", value: base, unit: "msg/s"}
	s := line{key: "subject", what: "2. subject", value: subject, unit: "msg/s", baseline: "base", baseValue: base,
		target: target{ratioAtLeast, 0.5}, notes: "subject notes"}
	t := line{what: "3. tail", value: tail, unit: "ms", worst: true, target: target{atMost, 25}}
	return []line{b, s, t}
}

func TestCombineRoundsTakesTheMedianOfPerRoundRatios(t *testing.T) {
	// Per-round ratios 0.60, 0.50, 0.45: median 0.50 (met). The ratio of
	// the medians, 90/200 = 0.45, would miss: the rounds are compared
	// each with its own baseline.
	got := combineRounds([][]line{
		roundLines(100, 60, 10),
		roundLines(300, 150, 30),
		roundLines(200, 90, 20),
	})
	if len(got) != 3 {
		t.Fatalf("got %d lines, want 3: %+v", len(got), got)
	}
	base, subj, tail := got[0], got[1], got[2]
	if base.value != 200 || !math.IsNaN(base.ratio()) {
		t.Errorf("baseline: value %v ratio %v, want 200 and no ratio", base.value, base.ratio())
	}
	if subj.value != 90 {
		t.Errorf("subject value %v, want the median 90", subj.value)
	}
	if r := subj.ratio(); math.Abs(r-0.5) > 1e-9 {
		t.Errorf("subject ratio %v, want 0.5, the median of the per-round ratios", r)
	}
	if subj.baseValue != 200 {
		t.Errorf("subject's baseline shown as %v, want the median 200", subj.baseValue)
	}
	if subj.met() != "yes" {
		t.Errorf("subject met = %q, want yes", subj.met())
	}
	for _, want := range []string{"subject notes; rounds 1: 60 msg/s (0.60×), 2: 150 msg/s (0.50×), 3: 90 msg/s (0.45×)", "notes of round 3, the median"} {
		if !strings.Contains(subj.notes, want) {
			t.Errorf("subject notes %q lack %q", subj.notes, want)
		}
	}
	if tail.value != 30 || tail.met() != "**NO**" {
		t.Errorf("tail %v (%s), want the worst round's 30, a miss", tail.value, tail.met())
	}
	if !strings.Contains(tail.notes, "notes of round 2, the worst") {
		t.Errorf("tail notes %q do not name round 2 as the worst", tail.notes)
	}
}

func TestCombineRoundsEvenCountAndFailures(t *testing.T) {
	failed := line{row: "subject", what: "subject: failed", err: errors.New("boom"), notes: "boom"}
	r2 := roundLines(100, 0, 5)[:1] // the subject's row failed in round 2
	r2 = append(r2, failed)
	got := combineRounds([][]line{
		roundLines(100, 40, 5),
		r2,
		roundLines(100, 80, 5),
		roundLines(100, 70, 5),
	})
	var subj, fail *line
	for i := range got {
		switch got[i].what {
		case "2. subject":
			subj = &got[i]
		case "subject: failed":
			fail = &got[i]
		}
	}
	if subj == nil || fail == nil {
		t.Fatalf("lines %+v: want the subject and its failure", got)
	}
	// Rounds 1, 3, 4: 40, 80, 70; median 70.
	if subj.value != 70 || math.Abs(subj.ratio()-0.7) > 1e-9 {
		t.Errorf("subject %v (%v×), want 70 (0.70×)", subj.value, subj.ratio())
	}
	if !strings.Contains(subj.notes, "measured in 3 of 4 rounds") {
		t.Errorf("subject notes %q do not say a round is missing", subj.notes)
	}
	if fail.err == nil || fail.notes != "round 2 of 4: boom" || fail.met() != "NO (failed)" {
		t.Errorf("failure line %+v, want it kept as a miss naming round 2", *fail)
	}
	// Four rounds of the baseline: the mean of the middle two.
	if got[0].value != 100 {
		t.Errorf("baseline %v, want 100", got[0].value)
	}
	two := combineRounds([][]line{roundLines(100, 40, 5), roundLines(100, 60, 5)})
	if two[1].value != 50 {
		t.Errorf("two rounds 40 and 60 combine to %v, want 50", two[1].value)
	}
}
