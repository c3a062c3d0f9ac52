package chaos

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	_ "github.com/lib/pq" // database/sql driver for the checker's queries
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

// clusterConfig describes the servers and replicas of one run.
type clusterConfig struct {
	// aof turns the Redis append-only file on, with appendfsync always.
	aof bool
	// ownPostgres starts a PostgreSQL of the run's own, which the
	// injector may stop; otherwise the run gets a database on the shared
	// test server.
	ownPostgres bool
	// mailpit sends emails to a Mailpit; otherwise they go to the outbox
	// folder.
	mailpit bool

	handlers, projectors int
	handlerConcurrency   int
	// summarizerDelay, if set, points the document processor at a stand-in
	// for a remote model that takes up to this long per summary, so that
	// handlers hold documents long enough for kills to interrupt work.
	summarizerDelay time.Duration
}

// cluster is one running pipeline: its servers and conveyor processes.
type cluster struct {
	t     *testing.T
	cfg   clusterConfig
	redis *embedded.Redis
	rdb   *redis.Client
	pg    *embedded.Postgres // nil with a database on the shared server
	db    *sql.DB
	mail  *testenv.Mailpit
	env   []string

	api        *harness.Proc
	handlers   []*harness.Proc
	projectors []*harness.Proc
}

// Role names, also the prefix of consumer names.
const (
	roleHandler   = "handler"
	roleProjector = "projector"
)

// startCluster starts the servers, migrates, and starts the api and the
// replicas; it returns once every process is ready. Everything is stopped
// at cleanup.
func startCluster(t *testing.T, cc clusterConfig) *cluster {
	t.Helper()
	c := &cluster{t: t, cfg: cc}
	rcfg := embedded.RedisConfig{}
	if cc.aof {
		// appendfsync always: Redis fsyncs the AOF before it answers a
		// write. With everysec a crash of the machine (or of Redis while
		// a slow fsync holds writes back) can lose about a second of
		// writes already acknowledged, that is events already answered
		// 202: the run would then measure the setting, not the code.
		rcfg.AppendFsync = "always"
	} else {
		off := false
		rcfg.AppendOnly = &off
	}
	c.redis = testenv.StartRedis(t, rcfg)
	c.rdb = redis.NewClient(&redis.Options{Addr: c.redis.Addr()})
	t.Cleanup(func() { _ = c.rdb.Close() })

	dbURL := ""
	if cc.ownPostgres {
		c.pg = testenv.StartPostgres(t, embedded.PostgresConfig{})
		dbURL = c.pg.URL()
	} else {
		dbURL = testenv.DatabaseURL(t)
	}
	db, err := sql.Open("postgres", dbURL)
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	c.db = db
	t.Cleanup(func() { _ = db.Close() })

	c.env = []string{
		"REDIS_URL=" + c.redis.URL(),
		"DATABASE_URL=" + dbURL,
		"BLOB_DIR=" + t.TempDir(),
		"CLAIM_MIN_IDLE=2s",
		"RETRY_BACKOFF_MIN=200ms",
		// A retry budget longer than the longest outage the injector
		// causes (about 20s): an event that fails only because Redis or
		// PostgreSQL is down must not run out of attempts, or it would be
		// dead-lettered by design and counted against the run.
		"RETRY_BACKOFF_MAX=5s",
		"RETRY_MAX_ATTEMPTS=12",
		"SHUTDOWN_TIMEOUT=5s",
	}
	if cc.mailpit {
		c.mail = testenv.StartMailpit(t)
		c.env = append(c.env, "SMTP_URL="+c.mail.SMTPURL)
	} else {
		c.env = append(c.env, "OUTBOX_DIR="+t.TempDir())
	}

	if cc.summarizerDelay > 0 {
		c.env = append(c.env, "SUMMARIZER_URL="+slowSummarizer(t, cc.summarizerDelay), "SUMMARIZER_MODEL=slow")
	}

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if out, err := harness.Run(t, ctx, c.env, "migrate"); err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	c.api = harness.Start(t, "api", c.env, "api")
	for i := 1; i <= cc.handlers; i++ {
		name := fmt.Sprintf("%s-%d", roleHandler, i)
		c.handlers = append(c.handlers, harness.Start(t, name, c.consumerEnv(name),
			"handler", "--concurrency", strconv.Itoa(cc.handlerConcurrency)))
	}
	for i := 1; i <= cc.projectors; i++ {
		name := fmt.Sprintf("%s-%d", roleProjector, i)
		c.projectors = append(c.projectors, harness.Start(t, name, c.consumerEnv(name), "projector"))
	}
	c.waitReady(3 * time.Minute)
	t.Cleanup(c.keepLogsOnFailure)
	return c
}

// keepLogsOnFailure copies the whole log of every process of a failed run
// (the test output shows only their ends) to a folder that outlives the
// test, and says where.
func (c *cluster) keepLogsOnFailure() {
	if !c.t.Failed() {
		return
	}
	dir, err := os.MkdirTemp("", "conveyor-chaos-logs-")
	if err != nil {
		c.t.Logf("keep logs: %v", err)
		return
	}
	for _, p := range c.procs() {
		if b, err := os.ReadFile(p.LogPath); err == nil {
			_ = os.WriteFile(filepath.Join(dir, p.Name+".log"), b, 0o644)
		}
	}
	c.t.Logf("full process logs kept in %s", dir)
}

// diagnose describes the state of every stream and consumer, for a run
// that did not drain: the raw group and stream counters, each consumer's
// pending count and idle time, and each replica's deliveries and outcomes
// (delivered minus finished is its in-flight window in use).
func (c *cluster) diagnose(ctx context.Context) string {
	var b strings.Builder
	for _, s := range events.Types() {
		info, err := c.rdb.XInfoStream(ctx, s).Result()
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", s, err)
			continue
		}
		fmt.Fprintf(&b, "%s: length %d, last-generated-id %s, entries-added %d, max-deleted-id %s\n",
			s, info.Length, info.LastGeneratedID, info.EntriesAdded, info.MaxDeletedEntryID)
		groups, _ := c.rdb.XInfoGroups(ctx, s).Result()
		for _, g := range groups {
			fmt.Fprintf(&b, "  group %s: pending %d, last-delivered-id %s, entries-read %d, lag %d\n",
				g.Name, g.Pending, g.LastDeliveredID, g.EntriesRead, g.Lag)
			cs, _ := c.rdb.XInfoConsumers(ctx, s, g.Name).Result()
			for _, cn := range cs {
				fmt.Fprintf(&b, "    consumer %s: pending %d, idle %s\n", cn.Name, cn.Pending, cn.Idle)
			}
		}
	}
	client := &http.Client{Timeout: 2 * time.Second}
	defer client.CloseIdleConnections()
	for _, p := range c.consumers() {
		fmt.Fprintf(&b, "%s:", p.Name)
		for _, g := range sortedKeys(topology()) {
			d, err1 := scrapeMetric(client, p.URL(), fmt.Sprintf(`conveyor_messages_delivered_total{consumer_group=%q}`, g))
			f, err2 := scrapeMetric(client, p.URL(), fmt.Sprintf(`conveyor_messages_finished_total{consumer_group=%q`, g))
			if err1 != nil || err2 != nil {
				fmt.Fprintf(&b, " %s: metrics unavailable (%v)", g, errors.Join(err1, err2))
				continue
			}
			if d > 0 || f > 0 {
				fmt.Fprintf(&b, " %s delivered %.0f, finished %.0f;", g, d, f)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// slowSummarizer serves an OpenAI-compatible chat completions endpoint
// that answers after a random delay of up to maxDelay, standing in for a
// remote model; it returns the base URL.
func slowSummarizer(t *testing.T, maxDelay time.Duration) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/chat/completions" {
			http.NotFound(w, r)
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		select {
		case <-time.After(maxDelay/10 + rand.N(maxDelay*9/10)):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"A short summary."}}]}`)
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/v1"
}

// consumerEnv is the environment of a replica: a stable consumer name of
// its own, the same on every restart.
func (c *cluster) consumerEnv(name string) []string {
	return append(append([]string{}, c.env...), "CONSUMER_NAME="+name)
}

// consumers returns every handler and projector.
func (c *cluster) consumers() []*harness.Proc {
	return append(append([]*harness.Proc{}, c.handlers...), c.projectors...)
}

func (c *cluster) procs() []*harness.Proc {
	return append([]*harness.Proc{c.api}, c.consumers()...)
}

// role returns the role of a replica.
func role(p *harness.Proc) string {
	if strings.HasPrefix(p.Name, roleProjector) {
		return roleProjector
	}
	return roleHandler
}

// waitReady waits until every process answers /readyz, within a liveness
// bound. A restarted replica may first wait up to 15s for the consumer
// name lease of its killed predecessor to lapse.
func (c *cluster) waitReady(within time.Duration) {
	c.t.Helper()
	for _, p := range c.procs() {
		p.WaitReady(c.t, within)
	}
}

// restore brings back whatever is down: Redis, PostgreSQL, processes. It
// returns the processes that had ended by themselves (see supervise).
func (c *cluster) restore(ctx context.Context) []string {
	c.t.Helper()
	if err := c.rdb.Ping(ctx).Err(); err != nil {
		if err := c.redis.Restart(ctx); err != nil {
			c.t.Fatalf("restore redis: %v", err)
		}
	}
	if c.pg != nil {
		if err := c.db.PingContext(ctx); err != nil {
			if err := c.pg.Restart(ctx); err != nil {
				c.t.Fatalf("restore postgres: %v", err)
			}
		}
	}
	exits := c.supervise()
	c.waitReady(3 * time.Minute)
	return exits
}

// supervise restarts every process that ended without the injector
// ending it, as the deployment's supervisor does (compose runs every role
// with restart: unless-stopped), and describes each such exit: a role is
// meant to ride out outages, not to exit on them.
func (c *cluster) supervise() []string {
	c.t.Helper()
	var out []string
	for _, p := range c.procs() {
		if !p.Exited() {
			continue
		}
		out = append(out, fmt.Sprintf("%s exited by itself (%v): %s", p.Name, p.ExitErr(), lastLine(p.Log())))
		p.Restart(c.t)
	}
	return out
}

// lastLine returns the last non-empty line of s.
func lastLine(s string) string {
	s = strings.TrimRight(s, "\n")
	return s[strings.LastIndexByte(s, '\n')+1:]
}

// logFindings scans every process log for data races and panics; each is
// a bug of the binary.
func (c *cluster) logFindings() []string {
	var out []string
	for _, p := range c.procs() {
		log := p.Log()
		for _, needle := range []string{"WARNING: DATA RACE", "panic:", "fatal error:"} {
			if i := strings.Index(log, needle); i >= 0 {
				end := min(len(log), i+2000)
				out = append(out, fmt.Sprintf("%s log (%s): %q found %d times; first:\n%s", p.Name, filepath.Base(p.LogPath),
					needle, strings.Count(log, needle), log[i:end]))
			}
		}
	}
	return out
}

// countInLogs counts the lines holding needle in the logs of procs (every
// run of each: restarts append to the same log).
func countInLogs(procs []*harness.Proc, needle string) int {
	n := 0
	for _, p := range procs {
		b, err := os.ReadFile(p.LogPath)
		if err == nil {
			n += strings.Count(string(b), needle)
		}
	}
	return n
}
