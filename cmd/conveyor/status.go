package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/conveyor/conveyor/bus"
)

type statusOpts struct {
	json *bool
}

func statusCommand() *command {
	return &command{
		name:    "status",
		oneShot: true,
		summary: "show streams, consumer groups, lag, retries, delayed events and dead letters",
		usage: `Prints every stream with its length, its delayed events (held until their
time, and how many of them are past it: overdue means no scheduler moves them)
and, per consumer group, the entries pending (delivered, not acknowledged),
lagging (not yet delivered) and waiting for a retry, its consumers, and the
dead letters per group with the cap their stream is trimmed to.

OLDEST PENDING and OLDEST WAITING are the ages of the group's oldest entry
pending and oldest entry not yet delivered, on Redis's clock, from the time
in the entry's id (when it was appended: for a retry, when it was moved into
the group's retry stream), not from its delivery: a job that hangs while its
consumer's heartbeat keeps its idle time low shows here. "-" is none.

Members of a delay or retry set that were not events are set aside in a
list (<set>:unreadable): when there are any, their count is shown with the
command that lists them. --json always has every count, and the ages in
seconds (0 for none).`,
		vars:     []string{"REDIS_URL"},
		requires: []string{"REDIS_URL"},
		flags: func(fs *flag.FlagSet) any {
			return &statusOpts{json: fs.Bool("json", false, "print JSON")}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*statusOpts)
			rdb, err := cliRedisClient(env.cfg.RedisURL)
			if err != nil {
				return err
			}
			defer rdb.Close()
			st, err := bus.Inspect(ctx, rdb, topology())
			if err != nil {
				return err
			}
			if *opts.json {
				return json.NewEncoder(env.stdout).Encode(st)
			}
			tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STREAM\tLENGTH\tDELAYED\tOVERDUE\tGROUP\tPENDING\tOLDEST PENDING\tLAG\tOLDEST WAITING\tRETRYING\tCONSUMERS")
			for _, s := range st.Streams {
				for _, g := range s.Groups {
					consumers := ""
					for i, c := range g.Consumers {
						if i > 0 {
							consumers += ", "
						}
						consumers += fmt.Sprintf("%s (%d pending, idle %s)", c.Name, c.Pending, (time.Duration(c.IdleMS) * time.Millisecond).Round(time.Second))
					}
					lag := fmt.Sprint(g.Lag)
					if g.Lag < 0 {
						lag = "?"
					}
					group := g.Group
					switch {
					case g.Missing:
						group += " (missing: made again at the next start)"
					case g.Unlisted:
						group += " (read by no role: keeps what it has not acknowledged)"
					}
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d\t%s\t%s\t%s\t%d\t%s\n", s.Stream, s.Length, s.Delayed, s.DelayedOverdue,
						group, g.Pending, age(g.OldestPendingSeconds), lag, age(g.OldestWaitingSeconds), g.Retrying, consumers)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			unreadable(env.stdout, st)
			groups := make([]string, 0, len(st.DeadLetters))
			for g := range st.DeadLetters {
				groups = append(groups, g)
			}
			sort.Strings(groups)
			fmt.Fprintln(env.stdout)
			for _, g := range groups {
				n := st.DeadLetters[g]
				fmt.Fprintf(env.stdout, "dead letters of %s: %d (cap %s)\n", g, n, thousands(st.DeadLetterCap))
				if n >= st.DeadLetterCap {
					fmt.Fprintf(env.stdout, "  at the cap: each new dead letter of %s drops the oldest\n", g)
				}
			}
			return nil
		},
	}
}

// unreadable prints, for each delay or retry set that had members that were
// not events, how many were set aside, and how to list them.
func unreadable(w io.Writer, st bus.Status) {
	first := true
	line := func(what string, n int64, key string) {
		if n == 0 {
			return
		}
		if first {
			fmt.Fprintln(w)
			first = false
		}
		fmt.Fprintf(w, "%s: %d set aside, not events (list them: redis-cli -u \"$REDIS_URL\" LRANGE '%s' 0 -1)\n", what, n, key)
	}
	for _, s := range st.Streams {
		line("unreadable delayed events of "+s.Stream, s.DelayedUnreadable, bus.UnreadableKey(bus.DelayedSet(s.Stream)))
		for _, g := range s.Groups {
			line("unreadable retries of "+g.Group+" on "+s.Stream, g.RetryUnreadable, bus.UnreadableKey(bus.RetrySet(s.Stream, g.Group)))
		}
	}
}

// age writes an age in seconds for a person: "-" for none, then the two
// largest units ("45s", "3m07s", "2h05m", "3d04h").
func age(seconds float64) string {
	d := time.Duration(seconds * float64(time.Second))
	switch {
	case seconds <= 0:
		return "-"
	case d < time.Second:
		return "<1s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", d/time.Second)
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", d/time.Minute, d%time.Minute/time.Second)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%02dm", d/time.Hour, d%time.Hour/time.Minute)
	default:
		return fmt.Sprintf("%dd%02dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	}
}

// thousands writes n with commas between groups of three digits.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
