package api

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type httpMetrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	uploads  prometheus.Gauge
}

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	m := &httpMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_http_requests_total",
			Help: "HTTP requests, by route and status code.",
		}, []string{"route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "conveyor_http_request_duration_seconds",
			Help:    "HTTP request duration, by route.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"route"}),
		uploads: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "conveyor_http_uploads_in_flight",
			Help: "Uploads being received and stored now (at most MAX_CONCURRENT_UPLOADS).",
		}),
	}
	reg.MustRegister(m.requests, m.duration, m.uploads)
	return m
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// unmatchedRoute is the route label of requests no route takes (404, 405):
// one label, whatever the path, so that scans cannot grow the series.
const unmatchedRoute = "unmatched"

// wrap records the requests of route. It records in a defer, so that a
// handler's panic is counted too: as 500 if nothing was written yet, which
// is what the recoverer, outside the mux, then answers.
func (m *httpMetrics) wrap(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		returned := false
		defer func() {
			status := sw.status
			switch {
			case status == 0 && !returned:
				status = http.StatusInternalServerError
			case status == 0:
				status = http.StatusOK
			}
			m.requests.WithLabelValues(route, strconv.Itoa(status)).Inc()
			m.duration.WithLabelValues(route).Observe(time.Since(start).Seconds())
		}()
		h.ServeHTTP(sw, r)
		returned = true
	})
}
