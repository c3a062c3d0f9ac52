package chaos

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/projector"
)

// faultKind is one kind of fault the injector causes.
type faultKind int

const (
	faultKillHandler   faultKind = iota // kill -9 of a handler replica, restarted after a short pause
	faultKillProjector                  // kill -9 of a projector replica, restarted after a short pause
	faultShortGrace                     // SIGTERM to a replica, SIGKILL 200–500ms later if it still runs
	faultRedisKill                      // SIGKILL of redis-server, restarted 1–6s later on the same port and folder
	faultPostgresStop                   // PostgreSQL stopped for mode.postgresOutage, then restarted
	faultPoison                         // poison entries written straight into streams
	numFaults
)

func (k faultKind) String() string {
	return [...]string{"kill -9 handler", "kill -9 projector", "SIGTERM, grace too short",
		"Redis SIGKILL", "PostgreSQL stopped", "poison entries"}[k]
}

// plannedFault is one fault of the schedule, at a time after the start of
// the load.
type plannedFault struct {
	at   time.Duration
	kind faultKind
}

// plan spreads counts[k] faults of each kind over the middle 80% of window
// in an order drawn from r: one fault per slot, at a random point of the
// first half of its slot, so that faults do not overlap unless one takes
// longer than its slot.
func plan(r *rand.Rand, counts [numFaults]int, window time.Duration) []plannedFault {
	var kinds []faultKind
	for k, n := range counts {
		for range n {
			kinds = append(kinds, faultKind(k))
		}
	}
	if len(kinds) == 0 {
		return nil
	}
	r.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	slot := window * 8 / 10 / time.Duration(len(kinds))
	out := make([]plannedFault, len(kinds))
	for i, k := range kinds {
		out[i] = plannedFault{at: window/10 + slot*time.Duration(i) + time.Duration(r.Int64N(int64(slot)/2+1)), kind: k}
	}
	return out
}

// faultRecord is what the injector did.
type faultRecord struct {
	kind   faultKind
	victim string
	at     time.Duration // after the start of the load
	took   time.Duration
	note   string
}

// injector causes the planned faults, one at a time, on the test's
// goroutine (it restarts processes, which may fail the test).
type injector struct {
	t      *testing.T
	c      *cluster
	m      mode
	seed   uint64
	r      *rand.Rand
	start  time.Time
	poison *poisonBook
	recov  *recoveries
	dups   *counterBank

	records []faultRecord
	// exits describes the processes that ended by themselves; they were
	// restarted before the next fault.
	exits []string
	// handlerStops counts the handler runs ended before they could drain
	// (kill -9, or SIGTERM cut short): each may have sent emails it had
	// not yet marked as sent.
	handlerStops int
}

func newInjector(t *testing.T, c *cluster, m mode, seed uint64, start time.Time) *injector {
	return &injector{
		t: t, c: c, m: m, seed: seed, start: start,
		r:      rand.New(rand.NewPCG(seed, 3)),
		poison: &poisonBook{seed: seed},
		recov:  &recoveries{},
		dups:   newCounterBank(projectorDuplicates),
	}
}

// run causes the faults of sched at their times; it returns early if ctx
// ends.
func (in *injector) run(ctx context.Context, sched []plannedFault) {
	in.t.Helper()
	for _, f := range sched {
		if !sleepUntil(ctx, in.start.Add(f.at)) {
			return
		}
		for _, e := range in.c.supervise() {
			in.exits = append(in.exits, e)
			in.t.Logf("unexpected exit, restarted: %s", e)
		}
		rec := faultRecord{kind: f.kind, at: time.Since(in.start)}
		began := time.Now()
		rec.victim, rec.note = in.inject(ctx, f.kind)
		rec.took = time.Since(began)
		in.records = append(in.records, rec)
		in.t.Logf("fault %2d at %6s: %-24s %-12s took %s %s", len(in.records), rec.at.Round(100*time.Millisecond),
			f.kind, rec.victim, rec.took.Round(10*time.Millisecond), rec.note)
	}
}

// inject causes one fault and undoes it; it returns the victim and a note.
func (in *injector) inject(ctx context.Context, k faultKind) (victim, note string) {
	in.t.Helper()
	switch k {
	case faultKillHandler, faultKillProjector:
		group := in.c.handlers
		if k == faultKillProjector {
			group = in.c.projectors
		}
		p := group[in.r.IntN(len(group))]
		in.dups.scrape(p)
		killedAt := time.Now()
		p.Kill()
		in.dups.bank(p)
		if k == faultKillHandler {
			in.handlerStops++
		}
		held := in.recov.track(ctx, in.c.rdb, p.Name, role(p), killedAt, in.m.recoveryBound)
		pause := in.pause()
		sleepCtx(ctx, pause)
		p.Restart(in.t)
		return p.Name, fmt.Sprintf("(held %d entries; restarted after %s)", held, pause.Round(time.Millisecond))
	case faultShortGrace:
		all := in.c.consumers()
		p := all[in.r.IntN(len(all))]
		grace := 200*time.Millisecond + time.Duration(in.r.Int64N(int64(300*time.Millisecond)))
		in.dups.scrape(p)
		if err := p.Signal(syscall.SIGTERM); err != nil {
			if !p.Exited() {
				in.t.Fatalf("SIGTERM %s: %v", p.Name, err)
			}
			in.exits = append(in.exits, in.c.supervise()...)
			return p.Name, "(had exited by itself; restarted)"
		}
		note = fmt.Sprintf("(exited within the %s grace)", grace.Round(time.Millisecond))
		if !p.Wait(grace) {
			p.Kill()
			note = fmt.Sprintf("(SIGKILL after %s)", grace.Round(time.Millisecond))
			if role(p) == roleHandler {
				in.handlerStops++
			}
		}
		in.dups.bank(p)
		pause := in.pause()
		sleepCtx(ctx, pause)
		p.Restart(in.t)
		return p.Name, note
	case faultRedisKill:
		if err := in.c.redis.Kill(); err != nil {
			in.t.Fatalf("kill redis: %v", err)
		}
		// Up to about 3s the clients' own retries (go-redis redials and
		// retries each command) hide the outage; longer ones reach the
		// API's callers as 503s.
		pause := time.Second + time.Duration(in.r.Int64N(int64(5*time.Second)))
		sleepCtx(ctx, pause)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := in.c.redis.Restart(rctx); err != nil {
			in.t.Fatalf("restart redis: %v", err)
		}
		return "redis", fmt.Sprintf("(down %s)", pause.Round(time.Millisecond))
	case faultPostgresStop:
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := in.c.pg.Stop(pctx); err != nil {
			in.t.Fatalf("stop postgres: %v", err)
		}
		sleepCtx(ctx, in.m.postgresOutage)
		if err := in.c.pg.Restart(pctx); err != nil {
			in.t.Fatalf("restart postgres: %v", err)
		}
		return "postgres", fmt.Sprintf("(stopped %s)", in.m.postgresOutage)
	case faultPoison:
		n, err := in.poison.inject(ctx, in.c.rdb, in.r, in.m.poisonBatch)
		if err != nil {
			in.t.Fatalf("inject poison: %v", err)
		}
		return "streams", fmt.Sprintf("(%d entries)", n)
	}
	panic("unknown fault kind")
}

// pause is how long a killed replica stays down: 300ms to 3s.
func (in *injector) pause() time.Duration {
	return 300*time.Millisecond + time.Duration(in.r.Int64N(int64(2700*time.Millisecond)))
}

// streamGroup is one stream read by one consumer group.
type streamGroup struct{ stream, group string }

// readsOf returns every stream, retry streams included, that a replica of
// role reads, and the group it reads it as. It mirrors topology() in
// cmd/conveyor/app.go.
func readsOf(role string) []streamGroup {
	var main []streamGroup
	switch role {
	case roleHandler:
		main = []streamGroup{{events.TypeDocumentUploaded, handlers.DocumentGroup}, {events.TypeEmailRequested, handlers.EmailGroup}}
	case roleProjector:
		for _, s := range events.Types() {
			main = append(main, streamGroup{s, projector.Group})
		}
	}
	out := append([]streamGroup{}, main...)
	for _, sg := range main {
		out = append(out, streamGroup{bus.RetryStream(sg.stream, sg.group), sg.group})
	}
	return out
}

// topology maps each consumer group to the streams it reads, as
// bus.Inspect wants it.
func topology() map[string][]string {
	out := map[string][]string{}
	for _, r := range []string{roleHandler, roleProjector} {
		for _, sg := range readsOf(r) {
			if !strings.HasSuffix(sg.stream, ":retry") {
				out[sg.group] = append(out[sg.group], sg.stream)
			}
		}
	}
	return out
}

// pendingOf returns the entries pending for consumer in each of reads, as
// "stream entry-id".
func pendingOf(ctx context.Context, rdb *redis.Client, consumer string, reads []streamGroup) (map[string]bool, error) {
	out := map[string]bool{}
	for _, sg := range reads {
		ps, err := rdb.XPendingExt(ctx, &redis.XPendingExtArgs{
			Stream: sg.stream, Group: sg.group, Start: "-", End: "+", Count: 1_000_000, Consumer: consumer,
		}).Result()
		if err != nil && !strings.HasPrefix(err.Error(), "NOGROUP") {
			return nil, fmt.Errorf("xpending %s %s %s: %w", sg.stream, sg.group, consumer, err)
		}
		for _, p := range ps {
			out[sg.stream+" "+p.ID] = true
		}
	}
	return out, nil
}

// recovery is how long the entries a killed replica held stayed with it.
type recovery struct {
	victim, role string
	held         int
	took         time.Duration
	recovered    bool
}

// recoveries measures recovery after each kill -9: from the kill until
// every entry the replica held (pending under its consumer name at the
// kill) is no longer pending under that name, because it was finished, or
// claimed by another replica, or re-read and finished by the restarted
// replica. Each kill is watched by a goroutine polling XPENDING, within a
// bound.
type recoveries struct {
	mu      sync.Mutex
	wg      sync.WaitGroup
	results []recovery
}

// track snapshots what victim held right after its kill and starts
// watching it; it returns how many entries it held.
func (rs *recoveries) track(ctx context.Context, rdb *redis.Client, victim, role string, killedAt time.Time, bound time.Duration) int {
	reads := readsOf(role)
	var held map[string]bool
	for attempt := 0; ; attempt++ {
		var err error
		if held, err = pendingOf(ctx, rdb, victim, reads); err == nil || attempt == 20 || ctx.Err() != nil {
			break
		}
		sleepCtx(ctx, 100*time.Millisecond)
	}
	rec := recovery{victim: victim, role: role, held: len(held)}
	if len(held) == 0 {
		rec.recovered = true
		rs.add(rec)
		return 0
	}
	rs.wg.Go(func() {
		deadline := killedAt.Add(bound)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			now, err := pendingOf(ctx, rdb, victim, reads)
			if err == nil {
				left := 0
				for k := range held {
					if now[k] {
						left++
					}
				}
				if left == 0 {
					rec.took, rec.recovered = time.Since(killedAt), true
					break
				}
			}
			sleepCtx(ctx, 100*time.Millisecond)
		}
		if !rec.recovered {
			rec.took = time.Since(killedAt)
		}
		rs.add(rec)
	})
	return len(held)
}

func (rs *recoveries) add(r recovery) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.results = append(rs.results, r)
}

// wait waits for every watcher (each bounded) and returns the results.
func (rs *recoveries) wait() []recovery {
	rs.wg.Wait()
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]recovery(nil), rs.results...)
}

// projectorDuplicates is the projector's count of events its inbox had
// seen before: redeliveries and repeated publishes it absorbed.
const projectorDuplicates = `conveyor_projector_events_total{result="duplicate"}`

// counterBank sums a Prometheus counter over every run of every process.
// A counter restarts at zero with its process, so its last value is
// scraped just before each kill and banked; a background scrape keeps the
// last value fresh, and a final scrape adds the runs still alive. The sum
// is a lower bound: what a process counted between its last scrape and a
// kill -9 is lost with it.
type counterBank struct {
	metric string
	client *http.Client
	mu     sync.Mutex
	runs   map[*harness.Proc]*counterRun
	banked float64
}

type counterRun struct {
	gen  int // bumped when the run ends: a scrape begun before is void
	last float64
}

func newCounterBank(metric string) *counterBank {
	return &counterBank{metric: metric, client: &http.Client{Timeout: 2 * time.Second}, runs: map[*harness.Proc]*counterRun{}}
}

func (b *counterBank) run(p *harness.Proc) *counterRun {
	r := b.runs[p]
	if r == nil {
		r = &counterRun{}
		b.runs[p] = r
	}
	return r
}

// scrape reads p's counter, if p answers.
func (b *counterBank) scrape(p *harness.Proc) {
	if p.Exited() {
		return
	}
	b.mu.Lock()
	gen := b.run(p).gen
	b.mu.Unlock()
	v, err := scrapeMetric(b.client, p.URL(), b.metric)
	if err != nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.run(p); r.gen == gen && v > r.last {
		r.last = v
	}
}

// bank ends p's current run: its last value is kept.
func (b *counterBank) bank(p *harness.Proc) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.run(p)
	b.banked += r.last
	r.last = 0
	r.gen++
}

// total returns the banked values plus the last value of every live run.
func (b *counterBank) total() float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	sum := b.banked
	for _, r := range b.runs {
		sum += r.last
	}
	return sum
}

// scrapeEvery scrapes procs every interval until ctx ends.
func (b *counterBank) scrapeEvery(ctx context.Context, procs []*harness.Proc, interval time.Duration) {
	for sleepCtx(ctx, interval) {
		for _, p := range procs {
			b.scrape(p)
		}
	}
}

func (b *counterBank) close() { b.client.CloseIdleConnections() }

// scrapeMetric returns the sum of the samples of metric (a name with its
// labels, as the line starts) on base's /metrics.
func scrapeMetric(client *http.Client, base, metric string) (float64, error) {
	resp, err := client.Get(base + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s/metrics: %s", base, resp.Status)
	}
	sum := 0.0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, metric) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum, sc.Err()
}

// maxRecovery returns the longest recovery of role's kills, how many kills
// it covers and how many did not recover within the bound.
func maxRecovery(rs []recovery, role string) (longest time.Duration, kills, stuck int) {
	for _, r := range rs {
		if r.role != role {
			continue
		}
		kills++
		if !r.recovered {
			stuck++
		}
		longest = max(longest, r.took)
	}
	return longest, kills, stuck
}

// faultCounts counts the faults that happened, by kind.
func faultCounts(recs []faultRecord) [numFaults]int {
	var n [numFaults]int
	for _, r := range recs {
		n[r.kind]++
	}
	return n
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
