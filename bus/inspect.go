package bus

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// StreamStatus describes one stream and its consumer groups.
type StreamStatus struct {
	Stream string `json:"stream"`
	Length int64  `json:"length"`
	// Delayed events wait in the stream's delay set (PublishAt) until the
	// scheduler appends them at their time; DelayedOverdue of them are past
	// it. Overdue events that stay overdue mean no scheduler is running.
	Delayed        int64         `json:"delayed"`
	DelayedOverdue int64         `json:"delayed_overdue"`
	Groups         []GroupStatus `json:"groups"`
}

// GroupStatus describes one consumer group on one stream.
type GroupStatus struct {
	Group string `json:"group"`
	// Pending entries were delivered and not yet acknowledged.
	Pending int64 `json:"pending"`
	// Lag entries were not delivered yet (-1 if Redis cannot tell).
	Lag int64 `json:"lag"`
	// Retrying entries wait in the group's retry set or retry stream.
	Retrying  int64            `json:"retrying"`
	Consumers []ConsumerStatus `json:"consumers"`
	// Missing: the topology names the group, Redis does not have it (it
	// was deleted; the next start of a role makes it again, from the
	// stream's start, and retention keeps every entry until then).
	Missing bool `json:"missing,omitempty"`
	// Unlisted: Redis has the group, no role reads it (a retired or
	// renamed group). Retention keeps what it has not acknowledged, so
	// one with lag or pending entries keeps the stream from being
	// trimmed: delete it (XGROUP DESTROY) once it is not needed.
	Unlisted bool `json:"unlisted,omitempty"`
}

// ConsumerStatus describes one consumer of a group.
type ConsumerStatus struct {
	Name    string `json:"name"`
	Pending int64  `json:"pending"`
	IdleMS  int64  `json:"idle_ms"`
}

// Status is what an operator needs to see of the bus at a glance.
type Status struct {
	Streams     []StreamStatus   `json:"streams"`
	DeadLetters map[string]int64 `json:"dead_letters"`
	// DeadLetterCap is the length a dead-letter stream is trimmed to: at
	// it, each new dead letter drops the oldest (see DefaultDeadLetterMaxLen).
	DeadLetterCap int64 `json:"dead_letter_cap"`
}

// DefaultDeadLetterMaxLen is the default of SubscriberConfig.DeadLetterMaxLen,
// which conveyor does not change: Inspect reports it as the cap of every
// dead-letter stream, since Redis does not record the cap of a stream.
const DefaultDeadLetterMaxLen = 100_000

// Inspect reads the state of every stream and group of topology.
func Inspect(ctx context.Context, rdb redis.UniversalClient, topology map[string][]string) (Status, error) {
	byStream := map[string][]string{}
	for g, streams := range topology {
		for _, s := range streams {
			byStream[s] = append(byStream[s], g)
		}
	}
	names := make([]string, 0, len(byStream))
	for s := range byStream {
		names = append(names, s)
	}
	sort.Strings(names)
	st := Status{DeadLetters: map[string]int64{}, DeadLetterCap: DefaultDeadLetterMaxLen}
	for _, s := range names {
		ss := StreamStatus{Stream: s}
		n, err := rdb.XLen(ctx, s).Result()
		if err != nil {
			return st, fmt.Errorf("length of %s: %w", s, err)
		}
		ss.Length = n
		// Overdue: due (score, in ms) by now, as MoveDue picks them.
		dp := rdb.Pipeline()
		held := dp.ZCard(ctx, DelayedSet(s))
		overdue := dp.ZCount(ctx, DelayedSet(s), "-inf", strconv.FormatInt(time.Now().UnixMilli(), 10))
		if _, err := dp.Exec(ctx); err != nil {
			return st, fmt.Errorf("delayed events of %s: %w", s, err)
		}
		ss.Delayed, ss.DelayedOverdue = held.Val(), overdue.Val()
		var lastID string
		if info, err := rdb.XInfoStream(ctx, s).Result(); err == nil {
			lastID = info.LastGeneratedID
		}
		infos, err := rdb.XInfoGroups(ctx, s).Result()
		if err != nil && !strings.Contains(err.Error(), "no such key") {
			return st, fmt.Errorf("groups of %s: %w", s, err)
		}
		known := map[string]redis.XInfoGroup{}
		for _, gi := range infos {
			known[gi.Name] = gi
		}
		groups := byStream[s]
		listed := map[string]bool{}
		for _, g := range groups {
			listed[g] = true
		}
		for g := range known {
			if !listed[g] {
				groups = append(groups, g)
			}
		}
		sort.Strings(groups)
		for _, g := range groups {
			gs := GroupStatus{Group: g, Lag: -1, Unlisted: !listed[g]}
			gi, ok := known[g]
			gs.Missing = !ok
			if ok {
				gs.Pending, gs.Lag = gi.Pending, gi.Lag
				// Redis's lag counter can stay too high after a restart
				// that replayed the AOF (its entries-read counter lags the
				// group's position). A group that has read the last entry
				// has no lag, and no group lags by more than the stream
				// holds.
				switch {
				case lastID != "" && gi.LastDeliveredID == lastID:
					gs.Lag = 0
				case gs.Lag > n:
					gs.Lag = n
				}
			}
			pipe := rdb.Pipeline()
			zc := pipe.ZCard(ctx, RetrySet(s, g))
			rl := pipe.XLen(ctx, RetryStream(s, g))
			_, _ = pipe.Exec(ctx)
			gs.Retrying = zc.Val() + rl.Val()
			if cs, err := rdb.XInfoConsumers(ctx, s, g).Result(); err == nil {
				for _, c := range cs {
					gs.Consumers = append(gs.Consumers, ConsumerStatus{Name: c.Name, Pending: c.Pending, IdleMS: c.Idle.Milliseconds()})
				}
			}
			ss.Groups = append(ss.Groups, gs)
		}
		st.Streams = append(st.Streams, ss)
	}
	for g := range topology {
		n, err := rdb.XLen(ctx, DeadLetterStream(g)).Result()
		if err != nil {
			return st, fmt.Errorf("dead letters of %s: %w", g, err)
		}
		st.DeadLetters[g] = n
	}
	return st, nil
}

// StatusCollector exports Inspect as Prometheus gauges on every scrape:
// stream length, delayed events, group pending, lag (what a KEDA
// redis-streams scaler reads) and retrying entries, and dead letters per
// group, with their cap. conveyor_status_up says whether the read worked:
// when Redis is down or hung, the scrape still serves every other metric of
// the process, within collectTimeout.
type StatusCollector struct {
	rdb      redis.UniversalClient
	topology map[string][]string
	log      *slog.Logger
	// warned is when a failed read was last logged (unix ns): a Redis
	// outage is logged once a minute, not on every scrape.
	warned atomic.Int64

	up, length, delayed, overdue, pending, lag, retrying, dead, deadCap *prometheus.Desc
}

// collectTimeout bounds a scrape's read of Redis, well under Prometheus's
// default scrape timeout (10s).
const collectTimeout = 2 * time.Second

// NewStatusCollector returns a collector for topology on rdb. It logs a
// failed read to slog.Default().
func NewStatusCollector(rdb redis.UniversalClient, topology map[string][]string) *StatusCollector {
	return &StatusCollector{
		rdb: rdb, topology: topology, log: slog.Default(),
		up:       prometheus.NewDesc("conveyor_status_up", "1 if the last read of the streams' state from Redis worked, else 0 (and the other conveyor_stream_*, conveyor_group_*, conveyor_delayed_* and conveyor_dead_letters* series are missing).", nil, nil),
		length:   prometheus.NewDesc("conveyor_stream_length", "Entries in the stream.", []string{"stream"}, nil),
		delayed:  prometheus.NewDesc("conveyor_delayed_events", "Events held in the stream's delay set until their time.", []string{"stream"}, nil),
		overdue:  prometheus.NewDesc("conveyor_delayed_events_overdue", "Delayed events past their time and not yet appended to the stream (by the scheduler).", []string{"stream"}, nil),
		pending:  prometheus.NewDesc("conveyor_group_pending", "Entries delivered to the group and not yet acknowledged.", []string{"stream", "consumer_group"}, nil),
		lag:      prometheus.NewDesc("conveyor_group_lag", "Entries not yet delivered to the group.", []string{"stream", "consumer_group"}, nil),
		retrying: prometheus.NewDesc("conveyor_group_retrying", "Entries waiting for a retry.", []string{"stream", "consumer_group"}, nil),
		dead:     prometheus.NewDesc("conveyor_dead_letters", "Entries in the group's dead-letter stream.", []string{"consumer_group"}, nil),
		deadCap:  prometheus.NewDesc("conveyor_dead_letters_cap", "Length the group's dead-letter stream is trimmed to: at it, each new dead letter drops the oldest.", []string{"consumer_group"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *StatusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.length, c.delayed, c.overdue, c.pending, c.lag, c.retrying, c.dead, c.deadCap} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StatusCollector) Collect(ch chan<- prometheus.Metric) {
	st, err := c.inspect()
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		now, last := time.Now().UnixNano(), c.warned.Load()
		if now-last >= int64(time.Minute) && c.warned.CompareAndSwap(last, now) {
			c.log.Warn("read the streams' state for /metrics", "error", err)
		}
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	for _, s := range st.Streams {
		ch <- prometheus.MustNewConstMetric(c.length, prometheus.GaugeValue, float64(s.Length), s.Stream)
		ch <- prometheus.MustNewConstMetric(c.delayed, prometheus.GaugeValue, float64(s.Delayed), s.Stream)
		ch <- prometheus.MustNewConstMetric(c.overdue, prometheus.GaugeValue, float64(s.DelayedOverdue), s.Stream)
		for _, g := range s.Groups {
			ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(g.Pending), s.Stream, g.Group)
			if g.Lag >= 0 {
				ch <- prometheus.MustNewConstMetric(c.lag, prometheus.GaugeValue, float64(g.Lag), s.Stream, g.Group)
			}
			ch <- prometheus.MustNewConstMetric(c.retrying, prometheus.GaugeValue, float64(g.Retrying), s.Stream, g.Group)
		}
	}
	for g, n := range st.DeadLetters {
		ch <- prometheus.MustNewConstMetric(c.dead, prometheus.GaugeValue, float64(n), g)
		ch <- prometheus.MustNewConstMetric(c.deadCap, prometheus.GaugeValue, float64(st.DeadLetterCap), g)
	}
}

// inspect runs Inspect for at most collectTimeout. go-redis does not stop a
// command's read at the context's deadline (unless the client was made
// with ContextTimeoutEnabled) but at its ReadTimeout, and retries: against
// a hung Redis, Inspect would hold the scrape for seconds. So it runs
// aside, and is left to finish on its own past the timeout.
func (c *StatusCollector) inspect() (Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), collectTimeout)
	// Cancelled here, not by the goroutine: a result sent just before
	// would otherwise race the cancellation in the select below.
	defer cancel()
	type result struct {
		st  Status
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := Inspect(ctx, c.rdb, c.topology)
		done <- result{st, err}
	}()
	select {
	case r := <-done:
		return r.st, r.err
	case <-ctx.Done():
		return Status{}, fmt.Errorf("inspect streams: %w", ctx.Err())
	}
}
