package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math"
	"slices"
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
	force *bool
	json  *bool
}

// defaultListLimit is the default of dlq list --limit.
const defaultListLimit = 50

// listedLetter is a dead letter as dlq list --json prints it. NextAfter,
// on the last letter of a group's page when more follow, is the --after of
// the next page.
type listedLetter struct {
	bus.DeadLetter
	NextAfter string `json:"next_after,omitempty"`
}

func dlqCommand() *command {
	return &command{
		name:    "dlq",
		oneShot: true,
		summary: "list, show, replay or purge dead letters",
		usage: `Usage:
  conveyor dlq list    [--group G [--after ID]] [--limit N] [--json]
                                                          dead letters, oldest first (all groups
                                                          without --group); --after pages on
  conveyor dlq show    --group G ID...                      one dead letter in full
  conveyor dlq replay  --group G (ID... | --all) [--force]  back to work, for that group only
  conveyor dlq purge   --group G (ID... | --all)            delete for good

A message is dead-lettered after its last retry, at once for a permanent
error, when it cannot be decoded, or when it crashed its consumer too often.
Replay puts it on the group's retry stream with a fresh attempt count, so
other groups of the stream are not affected. Replaying a letter twice (two
replays at once, or one run again after it was interrupted) puts it back
once. Replay keeps, and reports, a letter of a stream that its group does
not read in any role (a retired group): nobody would read its retry
stream. --force replays it anyway. It also keeps, and reports, a letter
of a payload too large to take (over 4 MiB), which keeps only the first
64 KiB of it (show prints its size as truncated_from): replayed, it would
only be dead-lettered again, --force or not.

When a page of list is full and more letters follow, list ends with the
command for the next page (JSON: next_after on the page's last letter).`,
		vars:     []string{"REDIS_URL"},
		requires: []string{"REDIS_URL"},
		args:     true,
		flags: func(fs *flag.FlagSet) any {
			return &dlqOpts{
				group: fs.String("group", "", "consumer group (document-processor, email-sender, projector, ...)"),
				limit: fs.Int64("limit", defaultListLimit, "list at most this many per group"),
				after: fs.String("after", "", "list the dead letters after this id (the last one of the previous page); needs --group"),
				all:   fs.Bool("all", false, "replay or purge every dead letter of the group"),
				force: fs.Bool("force", false, "replay dead letters of a stream their group does not read in any role"),
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
		all := []listedLetter{} // JSON [] when there are none
		var more []string       // the next-page commands
		for _, g := range groups {
			// One more than the page tells whether more follow.
			list, err := dl.List(ctx, g, *opts.after, min(*opts.limit, math.MaxInt64-1)+1)
			if err != nil {
				return err
			}
			full := int64(len(list)) > *opts.limit
			if full {
				list = list[:*opts.limit]
			}
			for _, d := range list {
				all = append(all, listedLetter{DeadLetter: d})
			}
			if full {
				last := list[len(list)-1].ID
				all[len(all)-1].NextAfter = last
				next := "conveyor dlq list --group " + g + " --after " + last
				if *opts.limit != defaultListLimit {
					next += fmt.Sprintf(" --limit %d", *opts.limit)
				}
				more = append(more, next)
			}
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
		if err := tw.Flush(); err != nil {
			return err
		}
		for _, next := range more {
			fmt.Fprintln(env.stdout, "more: "+next)
		}
		return nil
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
		if *opts.force && verb != "replay" {
			return fmt.Errorf("%w: --force is for replay", errUsage)
		}
		if err := checkGroup(ctx, dl, *opts.group); err != nil {
			return err
		}
		var n int
		if verb == "replay" {
			if !*opts.force {
				dl = dl.WithTopology(topology())
			}
			n, err = dl.Replay(ctx, *opts.group, ids...)
			if errors.Is(err, bus.ErrTruncated) {
				err = fmt.Errorf("%w\n(dlq show prints what a truncated letter keeps; dlq purge removes it)", err)
			}
			if errors.Is(err, bus.ErrNotInTopology) {
				err = fmt.Errorf("%w\n(--force replays them anyway)", err)
			}
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

// checkGroup refuses a group that no role has and that has no dead-letter
// stream: a mistyped --group would replay or purge nothing, and say so as if
// all went well.
func checkGroup(ctx context.Context, dl *bus.DeadLetters, group string) error {
	topo := topology()
	if _, ok := topo[group]; ok {
		return nil
	}
	exists, err := dl.Exists(ctx, group)
	if err != nil || exists {
		return err
	}
	return fmt.Errorf("%w: no dead-letter stream for group %s (known: %s)", errUsage, group,
		strings.Join(slices.Sorted(maps.Keys(topo)), ", "))
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
