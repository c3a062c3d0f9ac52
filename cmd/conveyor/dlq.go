package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/conveyor/conveyor/bus"
)

type dlqOpts struct {
	group *string
	limit *int64
	all   *bool
	json  *bool
}

func dlqCommand() *command {
	return &command{
		name:    "dlq",
		summary: "list, show, replay or purge dead letters",
		usage: `Usage:
  conveyor dlq list    [--group G] [--limit N] [--json]   dead letters (all groups without --group)
  conveyor dlq show    --group G ID...                      one dead letter in full
  conveyor dlq replay  --group G (ID... | --all)            back to work, for that group only
  conveyor dlq purge   --group G (ID... | --all)            delete for good

A message is dead-lettered after its last retry, at once for a permanent
error, when it cannot be decoded, or when it crashed its consumer too often.
Replay puts it on the group's retry stream with a fresh attempt count, so
other groups of the stream are not affected.`,
		vars: []string{"REDIS_URL"},
		args: true,
		flags: func(fs *flag.FlagSet) any {
			return &dlqOpts{
				group: fs.String("group", "", "consumer group (document-processor, email-sender, projector, ...)"),
				limit: fs.Int64("limit", 50, "list at most this many per group"),
				all:   fs.Bool("all", false, "replay or purge every dead letter of the group"),
				json:  fs.Bool("json", false, "print JSON"),
			}
		},
		run: runDLQ,
	}
}

func runDLQ(ctx context.Context, env *environment, o any, args []string) error {
	opts := o.(*dlqOpts)
	if len(args) == 0 {
		return fmt.Errorf("%w: say list, show, replay or purge", errUsage)
	}
	if err := env.cfg.Require("REDIS_URL"); err != nil {
		return err
	}
	rdb, err := redisClient(env.cfg.RedisURL)
	if err != nil {
		return err
	}
	defer rdb.Close()
	dl := bus.NewDeadLetters(rdb)
	verb, ids := args[0], args[1:]
	needGroup := func() error {
		if *opts.group == "" {
			return fmt.Errorf("%w: %s needs --group", errUsage, verb)
		}
		return nil
	}
	switch verb {
	case "list":
		groups := []string{*opts.group}
		if *opts.group == "" {
			if groups, err = dl.Groups(ctx); err != nil {
				return err
			}
			sort.Strings(groups)
		}
		var all []bus.DeadLetter
		for _, g := range groups {
			list, err := dl.List(ctx, g, "", *opts.limit)
			if err != nil {
				return err
			}
			all = append(all, list...)
		}
		if *opts.json {
			return json.NewEncoder(env.stdout).Encode(all)
		}
		if len(all) == 0 {
			fmt.Fprintln(env.stdout, "no dead letters")
			return nil
		}
		tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GROUP\tID\tSTREAM\tEVENT\tATTEMPTS\tLAST FAILED\tERROR")
		for _, d := range all {
			event := d.EventID
			if event == "" {
				event = "(undecodable)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", d.Group, d.ID, d.Stream, event, d.Attempts,
				d.LastFailedAt.Format(time.RFC3339), oneLine(d.Error, 80))
		}
		return tw.Flush()
	case "show":
		if err := needGroup(); err != nil {
			return err
		}
		if len(ids) == 0 {
			return fmt.Errorf("%w: show needs dead-letter ids", errUsage)
		}
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		for _, id := range ids {
			d, err := dl.Get(ctx, *opts.group, id)
			if err != nil {
				return err
			}
			if err := enc.Encode(d); err != nil {
				return err
			}
		}
		return nil
	case "replay", "purge":
		if err := needGroup(); err != nil {
			return err
		}
		if len(ids) == 0 && !*opts.all {
			return fmt.Errorf("%w: %s needs dead-letter ids or --all", errUsage, verb)
		}
		if len(ids) > 0 && *opts.all {
			return fmt.Errorf("%w: give ids or --all, not both", errUsage)
		}
		var n int
		if verb == "replay" {
			n, err = dl.Replay(ctx, *opts.group, ids...)
		} else {
			n, err = dl.Purge(ctx, *opts.group, ids...)
		}
		past := map[string]string{"replay": "replayed", "purge": "purged"}[verb]
		fmt.Fprintf(env.stdout, "%s %d dead letter(s) of %s\n", past, n, *opts.group)
		return err
	default:
		return fmt.Errorf("%w: unknown dlq command %q", errUsage, verb)
	}
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
