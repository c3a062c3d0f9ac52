package bus

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// StreamStatus describes one stream and its consumer groups.
type StreamStatus struct {
	Stream string        `json:"stream"`
	Length int64         `json:"length"`
	Groups []GroupStatus `json:"groups"`
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
}

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
	st := Status{DeadLetters: map[string]int64{}}
	for _, s := range names {
		ss := StreamStatus{Stream: s}
		n, err := rdb.XLen(ctx, s).Result()
		if err != nil {
			return st, fmt.Errorf("length of %s: %w", s, err)
		}
		ss.Length = n
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
		sort.Strings(groups)
		for _, g := range groups {
			gs := GroupStatus{Group: g, Lag: -1}
			if gi, ok := known[g]; ok {
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
// stream length, group pending, lag (what a KEDA redis-streams scaler reads)
// and retrying entries, and dead letters per group.
type StatusCollector struct {
	rdb      redis.UniversalClient
	topology map[string][]string

	length, pending, lag, retrying, dead *prometheus.Desc
}

// NewStatusCollector returns a collector for topology on rdb.
func NewStatusCollector(rdb redis.UniversalClient, topology map[string][]string) *StatusCollector {
	return &StatusCollector{
		rdb: rdb, topology: topology,
		length:   prometheus.NewDesc("conveyor_stream_length", "Entries in the stream.", []string{"stream"}, nil),
		pending:  prometheus.NewDesc("conveyor_group_pending", "Entries delivered to the group and not yet acknowledged.", []string{"stream", "consumer_group"}, nil),
		lag:      prometheus.NewDesc("conveyor_group_lag", "Entries not yet delivered to the group.", []string{"stream", "consumer_group"}, nil),
		retrying: prometheus.NewDesc("conveyor_group_retrying", "Entries waiting for a retry.", []string{"stream", "consumer_group"}, nil),
		dead:     prometheus.NewDesc("conveyor_dead_letters", "Entries in the group's dead-letter stream.", []string{"consumer_group"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *StatusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.length, c.pending, c.lag, c.retrying, c.dead} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StatusCollector) Collect(ch chan<- prometheus.Metric) {
	st, err := Inspect(context.Background(), c.rdb, c.topology)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.length, err)
		return
	}
	for _, s := range st.Streams {
		ch <- prometheus.MustNewConstMetric(c.length, prometheus.GaugeValue, float64(s.Length), s.Stream)
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
	}
}
