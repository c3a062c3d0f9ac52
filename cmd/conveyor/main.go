// Command conveyor runs every role of Conveyor from one binary:
//
//	conveyor api | handler | projector | scheduler | migrate | up
//	conveyor status | dlq | schedules | healthcheck | version
//
// Configuration comes from the environment (see `conveyor help`). Only this
// package wires the other packages together.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"text/tabwriter"
	// The distroless image has no zone database; schedules name zones.
	_ "time/tzdata"

	"github.com/conveyor/conveyor/config"
)

// version is set at build time with -ldflags "-X main.version=…"; otherwise
// the module version or VCS revision is used.
var version = ""

func main() {
	config.TuneGC(os.Getenv)
	// SIGHUP too: a closed terminal stops `conveyor up` as Ctrl-C does,
	// draining its work and stopping the servers it started. Unless it is
	// ignored (nohup): listening for it would undo that.
	sigs := []os.Signal{os.Interrupt, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		sigs = append(sigs, syscall.SIGHUP)
	}
	ctx, stop := signal.NotifyContext(context.Background(), sigs...)
	defer stop()
	go exitOnSecondSignal(ctx, stop, sigs)
	if len(os.Args) > 1 && longRunning[os.Args[1]] {
		// A server whose output goes to a pipe that closed (`| tee`
		// ended by the same Ctrl-C) would otherwise die of SIGPIPE at
		// its next log line, without draining or flushing its acks; its
		// writes fail instead.
		signal.Ignore(syscall.SIGPIPE)
	}
	os.Exit(run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// longRunning names the commands that run until stopped.
var longRunning = map[string]bool{"api": true, "handler": true, "projector": true, "scheduler": true, "up": true}

// exitOnSecondSignal ends the process at once on a signal that arrives
// while the first one's graceful stop runs (an impatient Ctrl-C): the
// stop would otherwise take up to SHUTDOWN_TIMEOUT whatever the user does.
// The servers `conveyor up` started die with it (on Linux; see embedded).
func exitOnSecondSignal(ctx context.Context, stop context.CancelFunc, sigs []os.Signal) {
	<-ctx.Done()
	again := make(chan os.Signal, 1)
	signal.Notify(again, sigs...)
	stop()
	s := <-again
	fmt.Fprintf(os.Stderr, "conveyor: %v again: exiting now, without finishing the graceful stop\n", s)
	os.Exit(130)
}

// command is one subcommand.
type command struct {
	name    string
	summary string
	// usage is the long help, printed after the synopsis.
	usage string
	// vars lists the environment variables the command reads.
	vars []string
	// requires lists the variables the command cannot run without: one
	// that is unset is a configuration error (exit status 2), reported
	// with the others.
	requires []string
	// noConfig says the command reads no configuration (version): an
	// invalid environment does not stop it.
	noConfig bool
	// oneShot says the command does a job and exits (migrate, status,
	// dlq, schedules, healthcheck): a signal that cuts it short is a
	// failure (exit status 130), not the graceful stop it is for a
	// server, so that `conveyor dlq replay --all && ...` or compose's
	// service_completed_successfully does not take an interrupted run for
	// a finished one.
	oneShot bool
	// flags adds the command's flags to fs.
	flags func(fs *flag.FlagSet) any
	// args says the command takes positional arguments; without it, any is
	// a usage error.
	args bool
	run  func(ctx context.Context, env *environment, opts any, args []string) error
}

// environment is what a command runs with.
type environment struct {
	cfg    config.Config
	getenv func(string) string
	stdout io.Writer
	stderr io.Writer
}

var allVars = []string{"REDIS_URL", "CACHE_REDIS_URL", "DATABASE_URL", "HTTP_ADDR", "BLOB_DIR", "SMTP_URL", "SMTP_FROM",
	"SMTP_TIMEOUT", "OUTBOX_DIR", "CONSUMER_NAME", "MAX_UPLOAD_BYTES", "MAX_CONCURRENT_UPLOADS", "CACHE_TTL", "LOG_LEVEL", "LOG_FORMAT",
	"SUMMARIZER_URL", "SUMMARIZER_MODEL", "SUMMARIZER_API_KEY", "RETRY_MAX_ATTEMPTS", "RETRY_BACKOFF_MIN",
	"RETRY_BACKOFF_MAX", "CLAIM_MIN_IDLE", "SHUTDOWN_TIMEOUT", "SHUTDOWN_DELAY", "SCHEDULES_FILE", "MAX_DELAY", "STUCK_AFTER", "BLOB_RETENTION", "INBOX_RETENTION"}

func commands() []*command {
	return []*command{
		apiCommand(), handlerCommand(), projectorCommand(), migrateCommand(), upCommand(),
		schedulerCommand(), schedulesCommand(), healthcheckCommand(), statusCommand(), dlqCommand(), versionCommand(),
	}
}

// errUsage marks an error caused by bad arguments: exit status 2.
var errUsage = errors.New("usage")

// errConfig marks an invalid configuration found by a command (exit
// status 2, as one config.Load finds).
var errConfig = errors.New("invalid configuration")

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmds := commands()
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) > 1 {
			for _, c := range cmds {
				if c.name == args[1] {
					commandUsage(stdout, c, flagSet(c, io.Discard))
					return 0
				}
			}
		}
		mainUsage(stdout, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var cmd *command
	for _, c := range cmds {
		if c.name == args[0] {
			cmd = c
		}
	}
	if cmd == nil {
		fmt.Fprintf(stderr, "conveyor: unknown command %q\n\n", args[0])
		mainUsage(stderr, cmds)
		return 2
	}
	fs := flagSet(cmd, stderr)
	var opts any
	if cmd.flags != nil {
		opts = cmd.flags(fs)
	}
	if err := fs.Parse(flagsFirst(fs, args[1:])); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if !cmd.args && fs.NArg() > 0 {
		fmt.Fprintf(stderr, "conveyor %s: unexpected argument %q (run `conveyor %s --help`)\n", cmd.name, fs.Arg(0), cmd.name)
		return 2
	}
	var cfg config.Config
	if !cmd.noConfig {
		var err error
		if cfg, err = config.Load(getenv, cmd.requires...); err != nil {
			fmt.Fprintf(stderr, "conveyor %s: invalid configuration:\n%s\n", cmd.name, indent(err.Error()))
			return 2
		}
	}
	env := &environment{cfg: cfg, getenv: getenv, stdout: stdout, stderr: stderr}
	if err := cmd.run(ctx, env, opts, fs.Args()); err != nil {
		if ctx.Err() != nil && (errors.Is(err, errStoppedWhileStarting) || errors.Is(err, context.Canceled)) {
			if cmd.oneShot {
				fmt.Fprintf(stderr, "conveyor %s: interrupted, not finished: %v\n", cmd.name, err)
				return 130
			}
			// Stopped by a signal while it started (waited for its
			// dependencies, created groups, leased its name): as graceful
			// as any stop.
			fmt.Fprintf(stderr, "conveyor %s: %v\n", cmd.name, err)
			return 0
		}
		if errors.Is(err, errUsage) || errors.Is(err, errConfig) {
			fmt.Fprintf(stderr, "conveyor %s: %v\n", cmd.name, err)
			return 2
		}
		fmt.Fprintf(stderr, "conveyor %s: %s\n", cmd.name, err)
		return 1
	}
	return 0
}

// flagsFirst lets flags come anywhere among a command's arguments: before,
// after and between its positional ones (`dlq replay --group G --all` as well
// as `dlq --group G replay --all`). Go's flag package stops at the first
// positional argument, so flagsFirst moves every flag, with its value, ahead
// of the positional arguments, which keep their order after a "--". A "--" in
// args ends the flags: everything after it is positional. Flags that fs does
// not define (and -h, --help) are moved too, so that Parse reports them.
func flagsFirst(fs *flag.FlagSet, args []string) []string {
	var flags, positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			positional = append(positional, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			continue
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			continue
		}
		// A flag that takes a value takes the next argument, as Parse does.
		// Without one, it is left last, with nothing after it to take,
		// and Parse reports the missing value.
		if i+1 == len(args) {
			return flags
		}
		i++
		flags = append(flags, args[i])
	}
	return append(append(flags, "--"), positional...)
}

func flagSet(c *command, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("conveyor "+c.name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() { commandUsage(out, c, fs) }
	return fs
}

func indent(s string) string {
	return "  " + strings.ReplaceAll(s, "\n", "\n  ")
}

func mainUsage(w io.Writer, cmds []*command) {
	fmt.Fprint(w, `Conveyor runs background work: an HTTP API accepts uploads and events, publishes
them to Redis Streams, handlers do the work, and a projector keeps Postgres read
models and the Redis cache up to date.

Usage:
  conveyor <command> [flags]

Commands:
`)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range cmds {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	tw.Flush()
	fmt.Fprint(w, "\nRun `conveyor <command> --help` for a command's flags and environment variables.\n\n")
	printVars(w, allVars)
}

func commandUsage(w io.Writer, c *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "conveyor %s: %s\n\n", c.name, c.summary)
	if c.usage != "" {
		fmt.Fprintln(w, strings.TrimSpace(c.usage))
		fmt.Fprintln(w)
	}
	hasFlags := false
	fs.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		fmt.Fprintln(w, "Flags:")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fmt.Fprintln(w)
	}
	if len(c.vars) > 0 {
		printVars(w, c.vars)
	}
}

func printVars(w io.Writer, names []string) {
	byName := map[string]config.Var{}
	for _, v := range config.Vars {
		byName[v.Name] = v
	}
	fmt.Fprintln(w, "Environment variables (any X may be given as X_FILE, a file holding the value):")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, n := range names {
		v := byName[n]
		def := v.Default
		if def == "" {
			def = "(unset)"
		}
		fmt.Fprintf(tw, "  %s\tdefault %s\n", n, def)
		fmt.Fprintf(tw, "  \t%s\n", v.Help)
	}
	tw.Flush()
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			if dirty {
				rev += "-dirty"
			}
			return "devel-" + rev
		}
	}
	return "devel"
}

func versionCommand() *command {
	return &command{
		name:     "version",
		summary:  "print the version",
		noConfig: true,
		run: func(_ context.Context, env *environment, _ any, _ []string) error {
			fmt.Fprintf(env.stdout, "conveyor %s\n", versionString())
			return nil
		},
	}
}
