package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"sort"
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
		summary: "show streams, consumer groups, lag, retries and dead letters",
		usage: `Prints every stream with its length and, per consumer group, the entries
pending (delivered, not acknowledged), lagging (not yet delivered) and waiting
for a retry, its consumers, and the dead letters per group.`,
		vars: []string{"REDIS_URL"},
		flags: func(fs *flag.FlagSet) any {
			return &statusOpts{json: fs.Bool("json", false, "print JSON")}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*statusOpts)
			if err := env.cfg.Require("REDIS_URL"); err != nil {
				return err
			}
			rdb, err := redisClient(env.cfg.RedisURL)
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
			fmt.Fprintln(tw, "STREAM\tLENGTH\tGROUP\tPENDING\tLAG\tRETRYING\tCONSUMERS")
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
					fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%d\t%s\n", s.Stream, s.Length, g.Group, g.Pending, lag, g.Retrying, consumers)
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
				fmt.Fprintf(env.stdout, "dead letters of %s: %d\n", g, st.DeadLetters[g])
			}
			return nil
		},
	}
}
