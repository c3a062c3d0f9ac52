package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"
)

// targetKind says how a measurement is judged.
type targetKind int

const (
	noTarget     targetKind = iota
	ratioAtLeast            // value / baseline >= v
	atLeast                 // value >= v
	atMost                  // value <= v
)

// target is the goal of one measurement.
type target struct {
	kind targetKind
	v    float64
}

func (t target) String() string {
	switch t.kind {
	case ratioAtLeast:
		if t.v < 1 {
			return fmt.Sprintf("≥ %.0f%% of baseline", t.v*100)
		}
		return fmt.Sprintf("≥ %g× baseline", t.v)
	case atLeast:
		return "≥ " + formatNum(t.v)
	case atMost:
		return "≤ " + formatNum(t.v)
	}
	return "—"
}

// Roles colour the chart and tell Conveyor's measurements from the others.
const (
	roleConveyor = "conveyor"
	roleBaseline = "baseline"
	rolePeer     = "peer"
)

// line is one row of the results table.
type line struct {
	row  string // the row (rowSpec.name) it belongs to
	key  string // unique name: other lines use it as their baseline
	what string
	// value and unit are the result.
	value float64
	unit  string
	// baseline is the key of the line compared against; baseName and
	// baseValue are filled from it.
	baseline  string
	baseName  string
	baseValue float64
	target    target
	notes     string
	role      string
	// chart is "throughput", "latency" or "" (not charted).
	chart string
	// profile is the CPU profile taken while this value was measured.
	profile string
	err     error
	// worst marks a value whose rounds combine to the highest (a latency
	// tail, a peak of memory) instead of to the median.
	worst bool
	// combined marks a line made of the lines of several rounds; its
	// ratio is then roundRatio, the median of the ratios of each round
	// against the baseline of that round (NaN if none had one).
	combined   bool
	roundRatio float64
}

// ratio returns value/baseline, or NaN without a baseline.
func (l line) ratio() float64 {
	if l.combined {
		return l.roundRatio
	}
	if l.baseValue <= 0 {
		return math.NaN()
	}
	return l.value / l.baseValue
}

// met returns "yes", "NO", "n/a" (no target) or why it cannot be judged.
func (l line) met() string {
	if l.err != nil {
		return "NO (failed)"
	}
	ok := false
	switch l.target.kind {
	case noTarget:
		return "n/a"
	case ratioAtLeast:
		r := l.ratio()
		if math.IsNaN(r) {
			return "no baseline"
		}
		ok = r >= l.target.v
	case atLeast:
		ok = l.value >= l.target.v
	case atMost:
		ok = l.value <= l.target.v
	}
	if ok {
		return "yes"
	}
	return "**NO**"
}

func (l line) missed() bool {
	m := l.met()
	return strings.HasPrefix(m, "**NO") || strings.HasPrefix(m, "NO")
}

// bench is the state of one run.
type bench struct {
	opts    options
	env     *env
	log     *slog.Logger
	logFile io.Writer
	stamp   string
	row     rowSpec
	// round counts the rounds from 0 (see options.rounds); -1 once all
	// rounds ran.
	round int
	lines []line
	// done holds the lines of the rounds that ran before this one.
	done  [][]line
	notes []string
	// values holds every measured value by key, for later baselines.
	values  map[string]float64
	names   map[string]string
	elapsed time.Duration
}

// add records a result, resolving its baseline.
func (b *bench) add(l line) {
	l.row = b.row.name
	if l.baseline != "" {
		l.baseValue = b.values[l.baseline]
		l.baseName = shortName(b.names[l.baseline])
		if l.baseName == "" {
			l.baseName = l.baseline + " (not measured in this run)"
		}
	}
	if l.key != "" && l.err == nil {
		b.values[l.key] = l.value
		b.names[l.key] = l.what
	}
	b.lines = append(b.lines, l)
	r := l.ratio()
	ratio := ""
	if !math.IsNaN(r) {
		ratio = fmt.Sprintf(" (%.2f× %s)", r, l.baseline)
	}
	fmt.Fprintf(os.Stderr, "   %-58s %s%s  %s\n", l.what, formatValue(l.value, l.unit), ratio, l.met())
}

// note adds a sentence to the notes under the table, naming the round
// when there are several.
func (b *bench) note(format string, args ...any) {
	n := fmt.Sprintf(format, args...)
	if b.opts.rounds > 1 && b.round >= 0 {
		n = fmt.Sprintf("Round %d: %s", b.round+1, n)
	}
	b.notes = append(b.notes, n)
}

// nextRound starts a round: its baselines are its own.
func (b *bench) nextRound(round int) {
	if round > 0 {
		b.done = append(b.done, b.lines)
		b.lines = nil
	}
	b.round = round
	b.values = map[string]float64{}
	b.names = map[string]string{}
}

// finishRounds replaces the lines of every round with their combination
// and removes the CPU profiles of the rounds that no combined line shows.
func (b *bench) finishRounds() {
	if b.round < 0 {
		return
	}
	all := append(b.done, b.lines)
	b.done, b.round = nil, -1
	if len(all) == 1 {
		return
	}
	b.lines = combineRounds(all)
	kept := map[string]bool{}
	for _, l := range b.lines {
		kept[l.profile] = true
	}
	for _, ls := range all {
		for _, l := range ls {
			if l.profile != "" && !kept[l.profile] {
				_ = os.Remove(l.profile)
				kept[l.profile] = true // removed once
			}
		}
	}
}

// failed records a row that could not be measured: a miss, never hidden.
func (b *bench) failed(row string, err error) {
	b.lines = append(b.lines, line{row: row, what: row + ": failed", err: err, notes: oneLine(err.Error()), role: roleConveyor})
}

// shortName returns the row number of a line's description ("1b" of
// "1b. go-redis ..."), or the description itself.
func shortName(what string) string {
	if n, _, ok := strings.Cut(what, ". "); ok && len(n) <= 3 {
		return n
	}
	return what
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

// profiled runs fn under the CPU profiler when the current row is profiled,
// and returns the profile's path ("" if none).
func (b *bench) profiled(key string, fn func() error) (string, error) {
	if !b.row.conveyor || !b.opts.wantProfile(b.row.name) {
		return "", fn()
	}
	if b.opts.rounds > 1 {
		key = fmt.Sprintf("r%d-%s", b.round+1, key)
	}
	path := filepath.Join(b.opts.out, b.stamp+"-"+key+".pprof")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return "", fn()
	}
	err = fn()
	pprof.StopCPUProfile()
	if cerr := f.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return path, err
}

// formatNum writes n with thousands separators, or with two decimals when
// it is small.
func formatNum(n float64) string {
	if math.IsNaN(n) || math.IsInf(n, 0) {
		return "—"
	}
	if math.Abs(n) < 100 {
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", n), "0"), ".")
	}
	s := fmt.Sprintf("%.0f", n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i, c := range []byte(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, c)
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func formatValue(v float64, unit string) string {
	return formatNum(v) + " " + unit
}

// report prints the table and writes the Markdown report, the chart and the
// kept profiles.
func (b *bench) report(ctx context.Context) error {
	var md bytes.Buffer
	redisV, pgV := b.env.versions(ctx)
	fmt.Fprintf(&md, "# Conveyor benchmark %s\n\n", time.Now().Format("2006-01-02 15:04"))
	fmt.Fprintf(&md, "- Machine: %s; runtime.NumCPU %d, GOMAXPROCS %d; %s %s/%s.\n",
		cpuModel(), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&md, "- Go collector: %s in this process (Conveyor's code, the baselines and the peers that run in it) and in the minimal servers; the conveyor binary sets the same for itself.\n", gcSetting)
	redisOrigin, pgOrigin := "started by the bench", "started by the bench"
	if !b.env.startedRedis {
		redisOrigin = "REDIS_URL"
	}
	if !b.env.startedPG {
		pgOrigin = "DATABASE_URL"
	}
	fmt.Fprintf(&md, "- Redis %s (%s), AOF %s; PostgreSQL %s (%s), fsync %s, stock settings otherwise. "+
		"Conveyor, the baselines and the peers share these two servers and the machine's cores with the load generators.\n",
		redisV, redisOrigin, b.env.redisAOF, pgV, pgOrigin, b.env.pgFsync)
	perRound := ""
	if b.opts.rounds > 1 {
		perRound = ", in each round"
	}
	fmt.Fprintf(&md, "- Each measurement runs %s after a warm-up of %s (the sustained e2e row runs %s)%s; the whole run took %s.\n",
		b.opts.duration, b.opts.warmup, b.opts.e2eDuration, perRound, b.elapsed.Round(time.Second))
	if b.opts.rounds > 1 {
		fmt.Fprintf(&md, "- The rows ran %d times in turn (rounds), so that each row and its baselines are measured at several moments: "+
			"a result is the median of its rounds (the worst round for latency tails and peak memory), and a ratio is the median of "+
			"each round's ratio against the baseline measured in that round. A result's notes are those of its median round, "+
			"followed by every round's figure.\n", b.opts.rounds)
	}
	fmt.Fprintf(&md, "- Ratios compare with baselines measured in this run; a miss is shown as **NO**, never hidden.\n\n")

	md.WriteString("| What | Result | Baseline | Ratio | Target | Met? | Notes |\n")
	md.WriteString("| --- | ---: | --- | ---: | --- | --- | --- |\n")
	for _, l := range b.lines {
		result, base, ratio := "failed", "—", "—"
		if l.err == nil {
			result = formatValue(l.value, l.unit)
		}
		if l.baseline != "" {
			base = l.baseName
			if l.baseValue > 0 {
				base += " = " + formatValue(l.baseValue, b.unitOf(l.baseline))
			}
		}
		if r := l.ratio(); !math.IsNaN(r) && l.err == nil {
			ratio = fmt.Sprintf("%.2f×", r)
		}
		tgt := l.target.String()
		if l.target.kind == atLeast || l.target.kind == atMost {
			tgt += " " + l.unit
		}
		fmt.Fprintf(&md, "| %s | %s | %s | %s | %s | %s | %s |\n", l.what, result, base, ratio, tgt, l.met(), l.notes)
	}
	if len(b.notes) > 0 {
		md.WriteString("\nNotes:\n\n")
		for _, n := range b.notes {
			fmt.Fprintf(&md, "- %s\n", n)
		}
	}

	svgPath := filepath.Join(b.opts.out, b.stamp+".svg")
	if err := os.WriteFile(svgPath, []byte(b.chart()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(&md, "\nChart: `%s`.\n", filepath.Base(svgPath))

	profiles := b.profileTops(ctx)
	if profiles != "" {
		md.WriteString("\n## CPU profiles of Conveyor measurements that missed their target\n\n")
		md.WriteString(profiles)
	}
	mdPath := filepath.Join(b.opts.out, b.stamp+".md")
	if err := os.WriteFile(mdPath, md.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Print(md.String())
	fmt.Fprintf(os.Stderr, "\nwrote %s and %s\n", mdPath, svgPath)
	return nil
}

func (b *bench) unitOf(key string) string {
	for _, l := range b.lines {
		if l.key == key {
			return l.unit
		}
	}
	return ""
}

// profileTops keeps the profiles of missed measurements (all of them with
// -profile other than "misses") and returns the top functions of each.
func (b *bench) profileTops(ctx context.Context) string {
	var out strings.Builder
	for _, l := range b.lines {
		if l.profile == "" {
			continue
		}
		if !l.missed() {
			if b.opts.profile == "misses" && !b.sharedProfileMissed(l.profile) {
				_ = os.Remove(l.profile)
			}
			continue
		}
		if strings.Contains(out.String(), l.profile) {
			continue
		}
		fmt.Fprintf(&out, "### %s\n\n`%s`\n\n", l.what, l.profile)
		for _, args := range [][]string{{"-top", "-nodecount=10"}, {"-top", "-cum", "-nodecount=15"}} {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			cmd := exec.CommandContext(cctx, "go", append(append([]string{"tool", "pprof"}, args...), l.profile)...)
			top, err := cmd.CombinedOutput()
			cancel()
			fmt.Fprintf(&out, "`go tool pprof %s`:\n\n```\n", strings.Join(args, " "))
			if err != nil {
				fmt.Fprintf(&out, "go tool pprof failed: %v\n", err)
			}
			out.Write(top)
			out.WriteString("```\n\n")
		}
	}
	return out.String()
}

// sharedProfileMissed reports whether another line measured under the same
// profile missed its target (then the profile is kept).
func (b *bench) sharedProfileMissed(path string) bool {
	for _, l := range b.lines {
		if l.profile == path && l.missed() {
			return true
		}
	}
	return false
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}
