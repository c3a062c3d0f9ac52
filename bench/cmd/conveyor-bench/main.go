// Command conveyor-bench measures Conveyor against its baselines and peers in
// one run, on one Redis and one PostgreSQL, and reports every result as a
// ratio to a baseline measured in the same run.
//
// It starts its own redis-server (AOF off) and PostgreSQL (fsync on) as child
// processes through the embedded package, unless REDIS_URL and DATABASE_URL
// name servers to use instead. Those must be throw-away servers: the bench
// flushes the Redis database and truncates the tables between rows.
//
// The rows, in order (run a subset with -only):
//
//	ceiling    raw go-redis: pipelined XADD, and XREADGROUP COUNT 100 + pipelined XACK
//	watermill  stock watermill-redisstream subscriber, 8 consumers of one group
//	hop        Conveyor's bus router with a no-op typed handler (concurrency 64 and 256)
//	asynq      asynq v0.26: enqueue and no-op processing
//	river      River v0.51: InsertMany and no-op work with 1,000 workers
//	e2e        Conveyor end to end: publish -> handler -> completion event -> projector -> Postgres
//	latency    the e2e path at a fixed 1,000 events/s: accept -> read model committed
//	ingest     HTTP POST /v1/events and /v1/events/batch against a minimal XADD server
//	upload     HTTP POST /v1/documents of 100 MB against a raw disk write with fsync
//	read       HTTP GET /v1/documents/{id} cache hits against a minimal Redis GET server
//
// The rows run -rounds times in turn (3 by default), each round with
// baselines of its own: a result is the median of its rounds (the worst
// round for latency tails and peak memory) and a ratio the median of the
// per-round ratios, so that a machine whose speed drifts within minutes
// moves a row and its baselines together.
//
// It prints one Markdown table and writes <out>/<timestamp>.md and
// <out>/<timestamp>.svg (a chart of throughput and latency). CPU profiles of
// Conveyor measurements that miss their target are kept as
// <out>/<timestamp>-<measurement>.pprof and their top functions are added to
// the report.
//
// The load generators run in this process with a bounded number of
// goroutines, and every measurement is bounded in time; the whole run is
// bounded by -timeout. Load goes to 127.0.0.1 only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/conveyor/conveyor/config"
)

// options are the command-line settings of one run.
type options struct {
	duration    time.Duration
	e2eDuration time.Duration
	warmup      time.Duration
	short       bool
	out         string
	only        map[string]bool
	profile     string
	apiMode     string
	repo        string
	timeout     time.Duration
	prefill     int
	rounds      int
}

// rowSpec is one row of the benchmark.
type rowSpec struct {
	name string
	// conveyor marks rows that measure Conveyor itself (as opposed to
	// baselines and peers): these are profiled.
	conveyor bool
	run      func(ctx context.Context, b *bench) error
}

// rows is every row, in the order they run. Baselines run before the rows
// that compare against them.
var rows = []rowSpec{
	{"ceiling", false, runCeiling},
	{"watermill", false, runWatermill},
	{"hop", true, runHop},
	{"asynq", false, runAsynq},
	{"river", false, runRiver},
	{"e2e", true, runE2E},
	{"latency", true, runLatency},
	{"ingest", true, runIngest},
	{"upload", true, runUpload},
	{"read", true, runRead},
}

// gcSetting is the collector setting of this process and of the minimal
// servers it starts: Conveyor's own (config.TuneGC), so the Conveyor code
// running in this process runs as in the conveyor binary, and the baselines
// and peers here get the same collector.
var gcSetting string

func main() {
	gcSetting = config.TuneGC(os.Getenv)
	if len(os.Args) > 1 && os.Args[1] == minimalCommand {
		if err := minimalMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "minimal server:", err)
			os.Exit(1)
		}
		return
	}
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	if err := run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "conveyor-bench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("conveyor-bench", flag.ContinueOnError)
	var o options
	var only string
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measurement time of each row in each round (the e2e row uses -e2e-duration)")
	fs.DurationVar(&o.e2eDuration, "e2e-duration", 60*time.Second, "measurement time of the sustained end-to-end row in each round")
	fs.DurationVar(&o.warmup, "warmup", 0, "warm-up before each measurement (default: 5s, or 1s with -short)")
	fs.BoolVar(&o.short, "short", false, "smoke run: a few seconds per row")
	fs.StringVar(&o.out, "out", "results", "folder for the report, the chart and profiles")
	fs.StringVar(&only, "only", "", "comma-separated rows to run (default all): "+rowNames())
	fs.StringVar(&o.profile, "profile", "misses", `CPU profiles of Conveyor measurements: "misses" keeps those that miss their target, "all", "none", or a comma-separated list of rows`)
	fs.StringVar(&o.apiMode, "api", "binary", `how the HTTP rows run the API: "binary" (go build ./cmd/conveyor, run "conveyor api" as its own process) or "inproc" (api.New(...).Handler() in this process)`)
	fs.StringVar(&o.repo, "repo", "", "root of the conveyor repository (default: found from the working folder)")
	fs.DurationVar(&o.timeout, "timeout", 40*time.Minute, "upper bound of the whole run")
	fs.IntVar(&o.prefill, "prefill", 0, "entries pre-filled for the stream consumer rows (default 1,000,000, or 200,000 with -short)")
	fs.IntVar(&o.rounds, "rounds", 0, "how many times the rows run in turn; results are medians of the rounds, ratios medians of per-round ratios (default 3, or 1 with -short)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	durationSet := false
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "duration":
			durationSet = true
		}
	})
	if o.short {
		if !durationSet {
			o.duration = 3 * time.Second
		}
		if !isSet(fs, "e2e-duration") {
			o.e2eDuration = 5 * time.Second
		}
	}
	if o.warmup == 0 {
		o.warmup = 5 * time.Second
		if o.short {
			o.warmup = time.Second
		}
	}
	if o.rounds == 0 {
		o.rounds = 3
		if o.short {
			o.rounds = 1
		}
	}
	if o.rounds < 1 {
		return o, errors.New("-rounds must be at least 1")
	}
	if o.prefill == 0 {
		o.prefill = 1_000_000
		if o.short {
			o.prefill = 200_000
		}
	}
	if o.duration <= 0 || o.e2eDuration <= 0 {
		return o, errors.New("-duration and -e2e-duration must be positive")
	}
	if o.apiMode != "binary" && o.apiMode != "inproc" {
		return o, fmt.Errorf("-api must be binary or inproc, not %q", o.apiMode)
	}
	o.only = map[string]bool{}
	for _, r := range strings.Split(only, ",") {
		r = strings.TrimSpace(r)
		if r == "" {
			continue
		}
		if !slices.ContainsFunc(rows, func(s rowSpec) bool { return s.name == r }) {
			return o, fmt.Errorf("-only: unknown row %q (rows: %s)", r, rowNames())
		}
		o.only[r] = true
	}
	if o.repo == "" {
		var err error
		if o.repo, err = findRepo(); err != nil {
			return o, err
		}
	}
	return o, nil
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func rowNames() string {
	names := make([]string, len(rows))
	for i, r := range rows {
		names[i] = r.name
	}
	return strings.Join(names, ",")
}

// findRepo walks up from the working folder to the folder whose go.mod
// declares the conveyor module.
func findRepo() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/conveyor/conveyor\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cannot find the conveyor repository above the working folder; pass -repo")
		}
		dir = parent
	}
}

// wantProfile reports whether measurements of row are CPU-profiled.
func (o options) wantProfile(row string) bool {
	switch o.profile {
	case "none", "":
		return false
	case "all", "misses":
		return true
	}
	return slices.Contains(strings.Split(o.profile, ","), row)
}

// loadAverage returns the one-minute load average, or "?".
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

func run(ctx context.Context, o options) error {
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	stamp := time.Now().Format("20060102-150405")
	logPath := filepath.Join(o.out, stamp+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	log := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelWarn}))
	slog.SetDefault(log)

	fmt.Fprintf(os.Stderr, "conveyor-bench: %d CPUs, GOMAXPROCS %d; per-row %s, e2e %s, warm-up %s; log %s\n",
		runtime.NumCPU(), runtime.GOMAXPROCS(0), o.duration, o.e2eDuration, o.warmup, logPath)
	e, err := startEnv(ctx, o, log, logFile)
	if err != nil {
		return err
	}
	defer e.close()

	b := &bench{opts: o, env: e, log: log, logFile: logFile, stamp: stamp}
	start := time.Now()
	var loads, speeds []string
	var speed0 float64 // the first probe: 1.00
	relSpeed := func() string {
		v := probeSpeed(speedProbeTime)
		if speed0 == 0 {
			speed0 = v
		}
		return fmt.Sprintf("%.2f", v/speed0)
	}
	for round := range o.rounds {
		b.nextRound(round)
		name := func(row string) string {
			if o.rounds > 1 {
				return fmt.Sprintf("%s (round %d)", row, round+1)
			}
			return row
		}
		for _, r := range rows {
			if len(o.only) > 0 && !o.only[r.name] {
				continue
			}
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintf(os.Stderr, "== %s\n", name(r.name))
			if err := e.reset(ctx); err != nil {
				return fmt.Errorf("reset before %s: %w", name(r.name), err)
			}
			b.row = r
			before := relSpeed()
			rowStart := time.Now()
			if err := r.run(ctx, b); err != nil {
				b.failed(r.name, err)
				fmt.Fprintf(os.Stderr, "   %s failed: %v\n", r.name, err)
			}
			took := time.Since(rowStart).Round(time.Second)
			load := loadAverage()
			after := relSpeed()
			loads = append(loads, fmt.Sprintf("%s %s", name(r.name), load))
			speeds = append(speeds, fmt.Sprintf("%s %s/%s", name(r.name), before, after))
			fmt.Fprintf(os.Stderr, "   %s took %s; load average %s; machine speed %s before, %s after\n", r.name, took, load, before, after)
		}
	}
	b.finishRounds()
	if len(loads) > 0 {
		b.note("Machine load average (1 min) at the end of each row: %s. It counts every process on the machine, "+
			"so a value well above the work of this run means other programs shared the cores.", strings.Join(loads, ", "))
		b.note("Machine speed before/after each row, relative to the first probe (a fixed JSON round trip and SHA-256 "+
			"on one goroutine for %s, between rows): %s. Shared and virtual machines drift by tens of percent "+
			"within minutes; a row and its baseline measured at different speeds compare less well, which the "+
			"rounds are for.",
			speedProbeTime, strings.Join(speeds, ", "))
	}
	b.elapsed = time.Since(start)
	return b.report(ctx)
}
