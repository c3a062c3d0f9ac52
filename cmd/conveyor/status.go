package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
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
		summary: "show streams, consumer groups, lag, retries, delayed events and dead letters",
		usage: `Prints every stream with its length, its delayed events (held until their
time, and how many of them are past it: overdue means no scheduler moves them)
and, per consumer group, the entries pending (delivered, not acknowledged),
lagging (not yet delivered) and waiting for a retry, its consumers, and the
dead letters per group with the cap their stream is trimmed to.`,
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
			fmt.Fprintln(tw, "STREAM\tLENGTH\tDELAYED\tOVERDUE\tGROUP\tPENDING\tLAG\tRETRYING\tCONSUMERS")
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
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d\t%s\t%d\t%s\n", s.Stream, s.Length, s.Delayed, s.DelayedOverdue,
						group, g.Pending, lag, g.Retrying, consumers)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
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

// thousands writes n with commas between groups of three digits.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
