package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Retention keeps streams bounded without losing work: an entry is trimmed
// only once every consumer group of its stream has acknowledged it (XTRIM
// MINID below the slowest group's oldest pending or unread entry), never by
// a blind MAXLEN. It also removes consumers that are gone: no pending
// entries and idle for longer than ConsumerIdle.
type Retention struct {
	cfg RetentionConfig
}

// RetentionConfig configures a Retention.
type RetentionConfig struct {
	// Client is the Redis holding the streams. Required.
	Client redis.UniversalClient
	// Topology maps each group to the streams it reads; their retry
	// streams are kept too. Required.
	Topology map[string][]string
	// Interval between passes. Defaults to 10s.
	Interval time.Duration
	// ConsumerIdle is how long a consumer without pending entries may be
	// idle before it is removed from its group. Defaults to 1h.
	ConsumerIdle time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// NewRetention returns a Retention.
func NewRetention(cfg RetentionConfig) (*Retention, error) {
	if cfg.Interval == 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.ConsumerIdle == 0 {
		cfg.ConsumerIdle = time.Hour
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var errs []error
	if cfg.Client == nil {
		errs = append(errs, errors.New("retention: Client is required"))
	}
	if len(cfg.Topology) == 0 {
		errs = append(errs, errors.New("retention: Topology is required"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &Retention{cfg: cfg}, nil
}

// Run trims every Interval until ctx ends. Several replicas may run it at
// once: trimming is idempotent.
func (r *Retention) Run(ctx context.Context) error {
	t := time.NewTicker(r.cfg.Interval)
	defer t.Stop()
	for {
		if _, err := r.Pass(ctx); err != nil && ctx.Err() == nil {
			r.cfg.Logger.Warn("stream retention pass", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// streams returns every stream of the topology with its retry streams.
func (r *Retention) streams() []string {
	seen := map[string]bool{}
	var out []string
	for group, streams := range r.cfg.Topology {
		for _, s := range streams {
			for _, k := range []string{s, RetryStream(s, group)} {
				if !seen[k] {
					seen[k] = true
					out = append(out, k)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// Pass runs one retention pass and returns how many entries it trimmed.
func (r *Retention) Pass(ctx context.Context) (int64, error) {
	var total int64
	var errs []error
	for _, stream := range r.streams() {
		n, err := r.trim(ctx, stream)
		total += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	return total, errors.Join(errs...)
}

// trim trims one stream below the point every group is past.
func (r *Retention) trim(ctx context.Context, stream string) (int64, error) {
	rdb := r.cfg.Client
	groups, err := rdb.XInfoGroups(ctx, stream).Result()
	if err != nil {
		if strings.Contains(err.Error(), "no such key") {
			return 0, nil
		}
		return 0, fmt.Errorf("groups of %s: %w", stream, err)
	}
	if len(groups) == 0 {
		// Nobody has declared interest yet: keep everything.
		return 0, nil
	}
	// A group the topology names for this stream that Redis does not
	// have was deleted (every start creates them all): it is made again
	// from the stream's start, and needs every entry there.
	for _, want := range r.groupsOf(stream) {
		if !slices.ContainsFunc(groups, func(g redis.XInfoGroup) bool { return g.Name == want }) {
			r.cfg.Logger.Warn("a consumer group is missing from its stream; keeping every entry until it is created again",
				"stream", stream, "consumer_group", want)
			return 0, nil
		}
	}
	// low is the oldest entry some group still needs: its oldest pending
	// entry, or else the first one after what it was last given.
	var low string
	for _, g := range groups {
		mark := nextID(g.LastDeliveredID)
		if g.Pending > 0 {
			p, err := rdb.XPending(ctx, stream, g.Name).Result()
			if err != nil {
				return 0, fmt.Errorf("pending of %s/%s: %w", stream, g.Name, err)
			}
			// The group may have acknowledged everything since XINFO
			// GROUPS: then there is no oldest pending entry, and what it
			// was last given as of XINFO is still a bound (what it was
			// given since comes after).
			if p.Count > 0 && p.Lower != "" {
				mark = p.Lower
			}
		}
		if low == "" || lessID(mark, low) {
			low = mark
		}
		if err := r.removeGoneConsumers(ctx, stream, g.Name); err != nil {
			r.cfg.Logger.Warn("remove gone consumers", "stream", stream, "consumer_group", g.Name, "error", err)
		}
	}
	if low == "" || low == "0-1" {
		return 0, nil
	}
	// An approximate trim removes at most its LIMIT (by default 100
	// nodes' worth, 10,000 entries) per call: a stream fed faster than
	// that per pass would grow without bound. So it trims in steps until
	// nothing is left below low, or trimSteps steps, which bounds a pass.
	var total int64
	for range trimSteps {
		n, err := rdb.XTrimMinIDApprox(ctx, stream, low, trimStep).Result()
		if err != nil {
			return total, fmt.Errorf("trim %s: %w", stream, err)
		}
		total += n
		if n == 0 {
			break
		}
	}
	return total, nil
}

// trimStep entries at most go in one XTRIM, and trimSteps of them in one
// pass of one stream: up to a million entries, at 10,000 a call, each of
// which Redis runs in well under a millisecond.
const (
	trimStep  = 10_000
	trimSteps = 100
)

// groupsOf returns the groups the topology names for stream, a stream or
// a group's retry stream (EnsureGroups creates the group on both).
func (r *Retention) groupsOf(stream string) []string {
	var out []string
	for group, streams := range r.cfg.Topology {
		if slices.ContainsFunc(streams, func(s string) bool { return s == stream || RetryStream(s, group) == stream }) {
			out = append(out, group)
		}
	}
	return out
}

// removeGoneConsumers deletes consumers with nothing pending that have not
// been seen for ConsumerIdle: replicas that were scaled away or renamed.
func (r *Retention) removeGoneConsumers(ctx context.Context, stream, group string) error {
	consumers, err := r.cfg.Client.XInfoConsumers(ctx, stream, group).Result()
	if err != nil {
		return err
	}
	for _, c := range consumers {
		if c.Pending == 0 && c.Idle > r.cfg.ConsumerIdle {
			// XGROUP DELCONSUMER of a consumer with pending entries would
			// lose them: the replica may have come back under its name
			// since XINFO CONSUMERS. The script checks and deletes in one
			// step.
			removed, err := delIdleConsumer.Run(ctx, r.cfg.Client, []string{stream}, group, c.Name).Int()
			if err != nil {
				return err
			}
			if removed == 1 {
				r.cfg.Logger.Info("removed gone consumer", "stream", stream, "consumer_group", group, "consumer", c.Name, "idle", c.Idle)
			}
		}
	}
	return nil
}

// delIdleConsumer deletes consumer ARGV[2] of group ARGV[1] on stream
// KEYS[1] if it has nothing pending, and returns 1 if it did.
var delIdleConsumer = redis.NewScript(`
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
`)

func parseID(id string) (ms, seq uint64) {
	a, b, _ := strings.Cut(id, "-")
	ms, _ = strconv.ParseUint(a, 10, 64)
	seq, _ = strconv.ParseUint(b, 10, 64)
	return ms, seq
}

func lessID(a, b string) bool {
	am, as := parseID(a)
	bm, bs := parseID(b)
	return am < bm || am == bm && as < bs
}

// nextID is the smallest id after id.
func nextID(id string) string {
	ms, seq := parseID(id)
	return strconv.FormatUint(ms, 10) + "-" + strconv.FormatUint(seq+1, 10)
}
