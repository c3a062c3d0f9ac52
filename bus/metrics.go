package bus

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the bus's Prometheus metrics. One Metrics serves every
// publisher and subscriber of a process.
type Metrics struct {
	publishes  *prometheus.CounterVec
	deliveries *prometheus.CounterVec
	outcomes   *prometheus.CounterVec
	claims     *prometheus.CounterVec
	handling   *prometheus.HistogramVec
}

// NewMetrics registers the bus metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_events_published_total",
			Help: "Events appended to streams, by stream and result (ok or error).",
		}, []string{"stream", "result"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_messages_delivered_total",
			Help: "Messages handed to handlers, by consumer group.",
		}, []string{"consumer_group"}),
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_messages_finished_total",
			Help: "Messages finished, by consumer group and outcome (acked, retried, dead_lettered, handed_back).",
		}, []string{"consumer_group", "outcome"}),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_messages_claimed_total",
			Help: "Entries claimed from idle (presumably dead) consumers, by consumer group.",
		}, []string{"consumer_group"}),
		handling: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "conveyor_handler_duration_seconds",
			Help:    "Time handlers took per message, by consumer group, event type and result.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"consumer_group", "event_type", "result"}),
	}
	reg.MustRegister(m.publishes, m.deliveries, m.outcomes, m.claims, m.handling)
	return m
}

func (m *Metrics) published(stream string, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.publishes.WithLabelValues(stream, result).Inc()
}

func (m *Metrics) handled(group, eventType string, err error, d time.Duration) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.handling.WithLabelValues(group, eventType, result).Observe(d.Seconds())
}

// deadLettered counts a dead letter of an entry that was never handed out
// (undecodable, or delivered more than MaxDeliveries times): finish counts
// the outcome of every delivery, and these never become one. Like finish,
// it is called once the entry is acknowledged, so an entry whose dead
// letter is written again (its acknowledgement failed) is counted once.
func (s *Subscriber) deadLettered() {
	if c := s.mOutcome[outcomeDeadLettered]; c != nil {
		c.Inc()
	}
}
