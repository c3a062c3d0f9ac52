package main

import (
	"context"
	"encoding/json"
	"errors"
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
	after *string
	all   *bool
	json  *bool
}

func dlqCommand() *command {
	return &command{
		name:    "dlq",
		summary: "list, show, replay or purge dead letters",
		usage: `Usage:
  conveyor dlq list    [--group G [--after ID]] [--limit N] [--json]
                                                          dead letters, oldest first (all groups
                                                          without --group); --after pages on
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
				after: fs.String("after", "", "list the dead letters after this id (the last one of the previous page); needs --group"),
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
	rdb, err := cliRedisClient(env.cfg.RedisURL)
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
	err = dlqVerb(ctx, env, dl, opts, verb, ids, needGroup)
	if errors.Is(err, bus.ErrBadDeadLetterID) {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	return err
}

func dlqVerb(ctx context.Context, env *environment, dl *bus.DeadLetters, opts *dlqOpts, verb string, ids []string, needGroup func() error) error {
	var err error
	switch verb {
	case "list":
		if len(ids) > 0 || *opts.all {
			return fmt.Errorf("%w: list takes no ids and no --all", errUsage)
		}
		if *opts.limit < 1 {
			return fmt.Errorf("%w: --limit must be at least 1", errUsage)
		}
		if *opts.after != "" && *opts.group == "" {
			return fmt.Errorf("%w: --after needs --group", errUsage)
		}
		groups := []string{*opts.group}
		if *opts.group == "" {
			if groups, err = dl.Groups(ctx); err != nil {
				return err
			}
			sort.Strings(groups)
		}
		all := []bus.DeadLetter{} // JSON [] when there are none
		for _, g := range groups {
			list, err := dl.List(ctx, g, *opts.after, *opts.limit)
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
		if errors.Is(err, bus.ErrBadDeadLetterID) {
			return err // nothing was done
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
