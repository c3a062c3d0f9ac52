package bus

import (
	"cmp"
	"context"
	"errors"
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
	Delayed        int64 `json:"delayed"`
	DelayedOverdue int64 `json:"delayed_overdue"`
	// DelayedUnreadable members of the delay set were not events: they
	// were set aside in the list UnreadableKey(DelayedSet(Stream)), where
	// they stay for an operator to look at (LRANGE) and delete.
	DelayedUnreadable int64         `json:"delayed_unreadable"`
	Groups            []GroupStatus `json:"groups"`
}

// GroupStatus describes one consumer group on one stream.
type GroupStatus struct {
	Group string `json:"group"`
	// Pending entries were delivered and not yet acknowledged.
	Pending int64 `json:"pending"`
	// Lag entries were not delivered yet (-1 if Redis cannot tell).
	Lag int64 `json:"lag"`
	// Retrying entries wait in the group's retry set or retry stream.
	Retrying int64 `json:"retrying"`
	// RetryUnreadable members of the group's retry set were not events:
	// they were set aside in the list UnreadableKey(RetrySet(stream,
	// group)), where they stay for an operator to look at (LRANGE) and
	// delete.
	RetryUnreadable int64 `json:"retry_unreadable"`
	// OldestWaitingSeconds is the age of the oldest entry not yet
	// delivered to the group, and OldestPendingSeconds that of the oldest
	// entry delivered and not acknowledged; 0 if there is none. An
	// entry's age is Redis's clock less the time in its id, when it was
	// appended: a consumer's heartbeat re-claims its entries, which
	// resets their idle time but not their age, so a job that hangs
	// shows here. They count the group's retry stream too, where an
	// entry's id is when its retry was moved there (once due), not when
	// its event was first published.
	OldestWaitingSeconds float64          `json:"oldest_waiting_seconds"`
	OldestPendingSeconds float64          `json:"oldest_pending_seconds"`
	Consumers            []ConsumerStatus `json:"consumers"`
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

// Inspect reads the state of every stream and group of topology. It makes
// two round trips to Redis however many streams and groups there are, as
// /metrics runs it on every scrape of every replica: a first pipeline
// reads what the names in topology give, a second what needs the groups
// it found (those no role reads, and where each group stands).
func Inspect(ctx context.Context, rdb redis.UniversalClient, topology map[string][]string) (Status, error) {
	byStream := map[string][]string{}
	groupNames := make([]string, 0, len(topology))
	for g, streams := range topology {
		groupNames = append(groupNames, g)
		for _, s := range streams {
			byStream[s] = append(byStream[s], g)
		}
	}
	sort.Strings(groupNames)
	names := make([]string, 0, len(byStream))
	for s := range byStream {
		names = append(names, s)
	}
	sort.Strings(names)
	st := Status{DeadLetters: map[string]int64{}, DeadLetterCap: DefaultDeadLetterMaxLen}

	type streamReads struct {
		length, held, overdue, unreadable *redis.IntCmd
		info                              *redis.XInfoStreamCmd
		groups                            *redis.XInfoGroupsCmd
		// retryGroups reads the groups of the retry streams of the
		// topology's groups of the stream, by group.
		retryGroups map[string]*redis.XInfoGroupsCmd
	}
	pipe := rdb.Pipeline()
	// Ages are measured on Redis's clock, which made the entries' ids: the
	// local clock of a replica can be off.
	clock := pipe.Time(ctx)
	// Overdue: due (score, in ms) by now, as MoveDue picks them.
	due := strconv.FormatInt(time.Now().UnixMilli(), 10)
	sr := make([]streamReads, len(names))
	for i, s := range names {
		r := &sr[i]
		r.length = pipe.XLen(ctx, s)
		r.held = pipe.ZCard(ctx, DelayedSet(s))
		r.overdue = pipe.ZCount(ctx, DelayedSet(s), "-inf", due)
		r.unreadable = pipe.LLen(ctx, UnreadableKey(DelayedSet(s)))
		r.info = pipe.XInfoStream(ctx, s)
		r.groups = pipe.XInfoGroups(ctx, s)
		r.retryGroups = map[string]*redis.XInfoGroupsCmd{}
		for _, g := range byStream[s] {
			r.retryGroups[g] = pipe.XInfoGroups(ctx, RetryStream(s, g))
		}
	}
	dead := make([]*redis.IntCmd, len(groupNames))
	for i, g := range groupNames {
		dead[i] = pipe.XLen(ctx, DeadLetterStream(g))
	}
	_, _ = pipe.Exec(ctx) // each command's error is looked at below

	type groupReads struct {
		retrySet, retryLen, unreadable *redis.IntCmd
		consumers                      *redis.XInfoConsumersCmd
		// Of the stream, then of the group's retry stream; nil where
		// nothing waits or is pending.
		waiting [2]*redis.XMessageSliceCmd
		pending [2]*redis.XPendingCmd
	}
	pipe = rdb.Pipeline()
	reads := make([][]groupReads, len(names))
	for i, s := range names {
		r := &sr[i]
		ss := StreamStatus{Stream: s}
		// Here as in the second round trip, a reply such as WRONGTYPE (a
		// key of another type under one of these names) leaves a figure at
		// zero; only a read that failed fails the whole.
		n, err := r.length.Result()
		if readFailed(err) {
			return st, fmt.Errorf("length of %s: %w", s, err)
		}
		ss.Length = n
		if err := cmp.Or(r.held.Err(), r.overdue.Err(), r.unreadable.Err()); readFailed(err) {
			return st, fmt.Errorf("delayed events of %s: %w", s, err)
		}
		ss.Delayed, ss.DelayedOverdue, ss.DelayedUnreadable = r.held.Val(), r.overdue.Val(), r.unreadable.Val()
		var lastID string
		switch info, err := r.info.Result(); {
		case err == nil:
			lastID = info.LastGeneratedID
		case readFailed(err):
			return st, fmt.Errorf("stream %s: %w", s, err)
		}
		infos, err := r.groups.Result() // "no such key" leaves the groups missing
		if readFailed(err) {
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
			gr := groupReads{
				retrySet:   pipe.ZCard(ctx, RetrySet(s, g)),
				retryLen:   pipe.XLen(ctx, RetryStream(s, g)),
				unreadable: pipe.LLen(ctx, UnreadableKey(RetrySet(s, g))),
				consumers:  pipe.XInfoConsumers(ctx, s, g),
			}
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
				gr.waiting[0], gr.pending[0] = readOldest(ctx, pipe, s, g, gi.LastDeliveredID, gs.Lag, gs.Pending)
			}
			// The retry stream of a group that no role reads is left
			// out: the first round trip did not know the group.
			if rc := r.retryGroups[g]; rc != nil {
				rinfos, err := rc.Result()
				if readFailed(err) {
					return st, fmt.Errorf("groups of %s: %w", RetryStream(s, g), err)
				}
				for _, ri := range rinfos {
					if ri.Name == g {
						gr.waiting[1], gr.pending[1] = readOldest(ctx, pipe, RetryStream(s, g), g, ri.LastDeliveredID, ri.Lag, ri.Pending)
					}
				}
			}
			ss.Groups = append(ss.Groups, gs)
			reads[i] = append(reads[i], gr)
		}
		st.Streams = append(st.Streams, ss)
	}
	for i, g := range groupNames {
		n, err := dead[i].Result()
		if readFailed(err) {
			return st, fmt.Errorf("dead letters of %s: %w", g, err)
		}
		st.DeadLetters[g] = n
	}
	now, err := clock.Result()
	if err != nil {
		return st, fmt.Errorf("time of Redis: %w", err)
	}

	// A reply such as NOGROUP (the group was deleted meanwhile) or
	// WRONGTYPE leaves a group's figure at zero; a read that failed fails
	// the whole, rather than show zeros as if they were read.
	cmds, _ := pipe.Exec(ctx)
	for _, c := range cmds {
		if err := c.Err(); readFailed(err) {
			return st, fmt.Errorf("consumer groups: %w", err)
		}
	}
	for i := range st.Streams {
		for j := range st.Streams[i].Groups {
			gs, gr := &st.Streams[i].Groups[j], reads[i][j]
			gs.Retrying = gr.retrySet.Val() + gr.retryLen.Val()
			gs.RetryUnreadable = gr.unreadable.Val()
			for _, c := range gr.consumers.Val() {
				gs.Consumers = append(gs.Consumers, ConsumerStatus{Name: c.Name, Pending: c.Pending, IdleMS: c.Idle.Milliseconds()})
			}
			for k := range 2 {
				if c := gr.waiting[k]; c != nil && len(c.Val()) > 0 {
					gs.OldestWaitingSeconds = max(gs.OldestWaitingSeconds, idAge(c.Val()[0].ID, now))
				}
				if c := gr.pending[k]; c != nil && c.Val() != nil {
					gs.OldestPendingSeconds = max(gs.OldestPendingSeconds, idAge(c.Val().Lower, now))
				}
			}
		}
	}
	return st, nil
}

// readOldest queues on pipe the reads of a group's oldest entry of stream
// not yet delivered to it (the first after its last-delivered id: deleted
// and trimmed entries are skipped) and of its smallest pending id (the
// summary form of XPENDING); neither if Redis counts none.
func readOldest(ctx context.Context, pipe redis.Pipeliner, stream, group, lastDelivered string, lag, pending int64) (*redis.XMessageSliceCmd, *redis.XPendingCmd) {
	var w *redis.XMessageSliceCmd
	var p *redis.XPendingCmd
	if lag != 0 {
		from := "-"
		if lastDelivered != "" {
			from = "(" + lastDelivered
		}
		w = pipe.XRangeN(ctx, stream, from, "+", 1)
	}
	if pending > 0 {
		p = pipe.XPending(ctx, stream, group)
	}
	return w, p
}

// idAge is the age in seconds, at now, of the entry id, whose first part
// is the time in ms on Redis's clock when the entry was appended (for an id
// Redis made: one given to XADD may say anything). An id in the future is 0
// old.
func idAge(id string, now time.Time) float64 {
	ms, _, _ := strings.Cut(id, "-")
	t, err := strconv.ParseInt(ms, 10, 64)
	if err != nil {
		return 0
	}
	return max(0, float64(now.UnixMilli()-t)/1000)
}

// readFailed reports an error that is not Redis's reply to the command (a
// lost connection, a timeout): the command was not read.
func readFailed(err error) bool {
	var reply redis.Error
	return err != nil && !errors.As(err, &reply)
}

// StatusCollector exports Inspect as Prometheus gauges on every scrape:
// stream length, delayed events, group pending, lag (what a KEDA
// redis-streams scaler reads) and retrying entries, the age of a group's
// oldest waiting and oldest pending entry, members of delay and retry sets
// set aside as unreadable, and dead letters per group, with their cap.
// conveyor_status_up says whether the read worked: when Redis is down or
// hung, the scrape still serves every other metric of the process, within
// collectTimeout.
type StatusCollector struct {
	rdb      redis.UniversalClient
	topology map[string][]string
	log      *slog.Logger
	// warned is when a failed read was last logged (unix ns): a Redis
	// outage is logged once a minute, not on every scrape.
	warned atomic.Int64

	up, length, delayed, overdue, unreadable, pending, lag, retrying, retryUnreadable *prometheus.Desc
	oldestWaiting, oldestPending, dead, deadCap                                       *prometheus.Desc
}

// collectTimeout bounds a scrape's read of Redis, well under Prometheus's
// default scrape timeout (10s).
const collectTimeout = 2 * time.Second

// NewStatusCollector returns a collector for topology on rdb. It logs a
// failed read to slog.Default().
func NewStatusCollector(rdb redis.UniversalClient, topology map[string][]string) *StatusCollector {
	return &StatusCollector{
		rdb: rdb, topology: topology, log: slog.Default(),
		up:              prometheus.NewDesc("conveyor_status_up", "1 if the last read of the streams' state from Redis worked, else 0 (and the other conveyor_stream_*, conveyor_group_*, conveyor_delayed_* and conveyor_dead_letters* series are missing).", nil, nil),
		length:          prometheus.NewDesc("conveyor_stream_length", "Entries in the stream.", []string{"stream"}, nil),
		delayed:         prometheus.NewDesc("conveyor_delayed_events", "Events held in the stream's delay set until their time.", []string{"stream"}, nil),
		overdue:         prometheus.NewDesc("conveyor_delayed_events_overdue", "Delayed events past their time and not yet appended to the stream (by the scheduler).", []string{"stream"}, nil),
		pending:         prometheus.NewDesc("conveyor_group_pending", "Entries delivered to the group and not yet acknowledged.", []string{"stream", "consumer_group"}, nil),
		lag:             prometheus.NewDesc("conveyor_group_lag", "Entries not yet delivered to the group.", []string{"stream", "consumer_group"}, nil),
		retrying:        prometheus.NewDesc("conveyor_group_retrying", "Entries waiting for a retry.", []string{"stream", "consumer_group"}, nil),
		unreadable:      prometheus.NewDesc("conveyor_delayed_unreadable", "Members of the stream's delay set that were not events, set aside in the list <delay set>:unreadable (see conveyor status).", []string{"stream"}, nil),
		retryUnreadable: prometheus.NewDesc("conveyor_group_retry_unreadable", "Members of the group's retry set that were not events, set aside in the list <retry set>:unreadable (see conveyor status).", []string{"stream", "consumer_group"}, nil),
		oldestWaiting:   prometheus.NewDesc("conveyor_group_oldest_waiting_seconds", "Age of the oldest entry not yet delivered to the group, by Redis's clock and the entry's id (a retry's from when it was moved into the retry stream); 0 if none waits.", []string{"stream", "consumer_group"}, nil),
		oldestPending:   prometheus.NewDesc("conveyor_group_oldest_pending_seconds", "Age of the group's oldest entry delivered and not acknowledged, by Redis's clock and the entry's id (a retry's from when it was moved into the retry stream); 0 if none is pending.", []string{"stream", "consumer_group"}, nil),
		dead:            prometheus.NewDesc("conveyor_dead_letters", "Entries in the group's dead-letter stream.", []string{"consumer_group"}, nil),
		deadCap:         prometheus.NewDesc("conveyor_dead_letters_cap", "Length the group's dead-letter stream is trimmed to: at it, each new dead letter drops the oldest.", []string{"consumer_group"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *StatusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.length, c.delayed, c.overdue, c.unreadable, c.pending, c.lag, c.retrying, c.retryUnreadable, c.oldestWaiting, c.oldestPending, c.dead, c.deadCap} {
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
		ch <- prometheus.MustNewConstMetric(c.unreadable, prometheus.GaugeValue, float64(s.DelayedUnreadable), s.Stream)
		for _, g := range s.Groups {
			ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(g.Pending), s.Stream, g.Group)
			if g.Lag >= 0 {
				ch <- prometheus.MustNewConstMetric(c.lag, prometheus.GaugeValue, float64(g.Lag), s.Stream, g.Group)
			}
			ch <- prometheus.MustNewConstMetric(c.retrying, prometheus.GaugeValue, float64(g.Retrying), s.Stream, g.Group)
			ch <- prometheus.MustNewConstMetric(c.retryUnreadable, prometheus.GaugeValue, float64(g.RetryUnreadable), s.Stream, g.Group)
			ch <- prometheus.MustNewConstMetric(c.oldestWaiting, prometheus.GaugeValue, g.OldestWaitingSeconds, s.Stream, g.Group)
			ch <- prometheus.MustNewConstMetric(c.oldestPending, prometheus.GaugeValue, g.OldestPendingSeconds, s.Stream, g.Group)
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
