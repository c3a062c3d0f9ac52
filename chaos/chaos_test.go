package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// TestChaos runs the pipeline under a seeded load while a seeded injector
// kills replicas, kills Redis, stops PostgreSQL and writes poison, then
// checks the ledger. It fails if an accepted request was lost, a fact was
// applied twice, or the dead letters differ from the poison.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("the chaos run starts a whole pipeline; it runs without -short (go test ./chaos/)")
	}
	m := currentMode()
	seed := chooseSeed()
	t.Logf("chaos seed %d (replay: go test -run 'TestChaos$' ./chaos/ -args -chaos.seed %d%s)", seed, seed, modeFlags(m))
	ctx, cancel := runContext(t)
	defer cancel()

	c := startCluster(t, clusterConfig{
		aof: true, ownPostgres: true, mailpit: true,
		handlers: m.handlers, projectors: m.projectors, handlerConcurrency: m.handlerConcurrency,
		summarizerDelay: m.summarizerDelay,
	})
	sched := plan(rand.New(rand.NewPCG(seed, 1)), m.faults, m.duration)
	l := newLedger()
	gen := newGenerator(c.api.URL(), l, seed, defaultMix, m)
	defer gen.close()

	start := time.Now()
	in := newInjector(t, c, m, seed, start)
	defer in.dups.close()
	scrapeCtx, stopScrape := context.WithCancel(ctx)
	scraped := make(chan struct{})
	go func() {
		defer close(scraped)
		in.dups.scrapeEvery(scrapeCtx, c.projectors, 2*time.Second)
	}()
	loadCtx, stopLoad := context.WithTimeout(ctx, m.loadBound)
	defer stopLoad()
	loaded := make(chan struct{})
	go func() {
		defer close(loaded)
		gen.run(loadCtx, 0, m.requests, m.duration/time.Duration(m.requests))
	}()

	// On an early end of the test (a fatal failure), stop and wait for
	// everything started here.
	defer func() {
		stopLoad()
		stopScrape()
		cancel()
		<-loaded
		<-scraped
		in.recov.wait()
	}()

	in.run(ctx, sched)
	t.Logf("faults done after %s; waiting for the load (%d accepted so far)", time.Since(start).Round(time.Second), sum(l.accepted()))
	<-loaded
	if loadCtx.Err() != nil && ctx.Err() == nil {
		t.Errorf("the load did not finish within %s; what was left was given up", m.loadBound)
	}
	stopScrape()
	<-scraped

	// Bring back anything down, let every group drain, then check.
	in.exits = append(in.exits, c.restore(ctx)...)
	oddLag, err := waitDrained(ctx, c.rdb, m.drainBound)
	if err != nil {
		t.Fatalf("%v\n%s", err, c.diagnose(ctx))
	}
	for _, p := range c.projectors {
		in.dups.scrape(p)
	}
	r := check(ctx, t, c, l, in.poison)
	r.mode, r.seed, r.requests, r.elapsed = m.name, seed, m.requests, time.Since(start)
	r.oddLag, r.exits = oddLag, in.exits
	r.retried, r.rotated, r.repeated, r.repeatsUnsettled = gen.retried.Load(), gen.rotated.Load(), gen.repeated.Load(), gen.repeatsUnsettled.Load()
	r.inboxDuplicates = in.dups.total()
	r.markAbsorbed = countInLogs(c.handlers, "email already sent; not sending again")
	r.faultsPlanned, r.faults = m.faults, faultCounts(in.records)
	r.recoveries = in.recov.wait()
	// A stopped handler may have handed emails to the SMTP server without
	// marking them sent: at most its in-flight window of the email group.
	// Redis kills are not counted: the sender retries the mark for about
	// 12s, longer than Redis is down, and the AOF keeps it.
	r.handlerStops, r.handlerConcurrency = in.handlerStops, m.handlerConcurrency
	r.dupEmailBudget = in.handlerStops * m.handlerConcurrency
	t.Log("\n" + r.table())
	for _, f := range r.failures() {
		t.Error(f)
	}
	for _, e := range r.exits {
		t.Logf("note: %s", e)
	}
	if len(r.dupEmailDetails) > 0 {
		t.Logf("note: duplicate emails (within the budget of handler stops): %s", first(r.dupEmailDetails, 20))
	}
	if len(r.oddLag) > 0 {
		t.Logf("note: Redis reports a lag for groups that were handed every entry: %s", strings.Join(r.oddLag, "; "))
	}
	if r.unledgered > 0 || sum(r.abandoned) > 0 {
		t.Logf("note: %d rows without a ledger entry and %d requests given up (see the table)", r.unledgered, sum(r.abandoned))
	}
}

// TestChaosNegativeControl checks that the checker can fail: with the AOF
// off, work accepted while the consumers are paused lives only in Redis's
// memory, and a kill -9 of Redis loses it. The checker must report loss,
// and only among the requests accepted during the pause.
func TestChaosNegativeControl(t *testing.T) {
	if testing.Short() {
		t.Skip("the chaos run starts a whole pipeline; it runs without -short (go test ./chaos/)")
	}
	seed := chooseSeed()
	t.Logf("negative control seed %d (replay: go test -run TestChaosNegativeControl ./chaos/ -args -chaos.seed %d)", seed, seed)
	ctx, cancel := runContext(t)
	defer cancel()
	m := shortMode()
	m.giveUp = 60 * time.Second
	c := startCluster(t, clusterConfig{aof: false, handlers: 1, projectors: 1, handlerConcurrency: m.handlerConcurrency})
	l := newLedger()
	mix := defaultMix
	mix.repeat = 0 // a repeat across the restart would meet a Redis that forgot the first answer
	gen := newGenerator(c.api.URL(), l, seed, mix, m)
	defer gen.close()
	start := time.Now()

	// Work accepted and done before the pause.
	gen.run(ctx, 0, 30, 20*time.Millisecond)
	if _, err := waitDrained(ctx, c.rdb, m.drainBound); err != nil {
		t.Fatalf("%v\n%s", err, c.diagnose(ctx))
	}
	// Work accepted while no consumer reads: only in Redis's memory.
	for _, p := range c.consumers() {
		if err := p.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	paused := time.Now()
	gen.run(ctx, 30, 60, 20*time.Millisecond)
	killed := time.Now()
	if err := c.redis.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := c.redis.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	for _, p := range c.consumers() {
		if err := p.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
	// Work accepted after the restart, by a Redis that starts empty.
	gen.run(ctx, 60, 90, 20*time.Millisecond)
	c.waitReady(3 * time.Minute)
	if _, err := waitDrained(ctx, c.rdb, m.drainBound); err != nil {
		t.Fatalf("%v\n%s", err, c.diagnose(ctx))
	}

	r := check(ctx, t, c, l, nil)
	r.mode, r.seed, r.requests, r.elapsed = "negative control (AOF off)", seed, 90, time.Since(start)
	t.Log("\n" + r.table())
	entries, _, _ := l.snapshot()
	inWindow := map[int]bool{}
	for _, e := range entries {
		if e.acceptedAt.After(paused) && e.acceptedAt.Before(killed) {
			inWindow[e.item] = true
		}
	}
	if len(inWindow) == 0 {
		t.Fatal("nothing was accepted while the consumers were paused: the control tested nothing")
	}
	if sum(r.lost) == 0 {
		t.Fatalf("the checker found no loss after Redis without AOF lost what %d accepted requests published", len(inWindow))
	}
	// Only work accepted in the window can be lost. Not all of it need
	// be: a consumer paused inside a blocking read may have received the
	// first entries of the window into its socket before Redis died.
	for _, item := range r.lostItems {
		if !inWindow[item] {
			t.Errorf("request %d is reported lost but was not accepted while the consumers were paused", item)
		}
	}
	t.Logf("the checker caught the loss: %d lost of the %d requests accepted while the consumers were paused (%d accepted in all)",
		sum(r.lost), len(inWindow), sum(r.accepted))
}

// runContext bounds a run by the test's deadline, leaving time for the
// report and the cleanups.
func runContext(t *testing.T) (context.Context, context.CancelFunc) {
	if d, ok := t.Deadline(); ok {
		return context.WithDeadline(t.Context(), d.Add(-30*time.Second))
	}
	return context.WithCancel(t.Context())
}

// modeFlags renders the flags that select m, for the replay line.
func modeFlags(m mode) string {
	var b strings.Builder
	if m.name == "full" {
		b.WriteString(" -chaos.full")
	}
	fmt.Fprintf(&b, " -chaos.events %d -chaos.duration %s", m.requests, m.duration)
	return b.String()
}

func TestPlan(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		counts [numFaults]int
		window time.Duration
	}{
		{"short", shortMode().faults, 40 * time.Second},
		{"full", fullMode().faults, 10 * time.Minute},
		{"one fault", [numFaults]int{faultRedisKill: 1}, time.Second},
		{"none", [numFaults]int{}, time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := plan(rand.New(rand.NewPCG(7, 1)), tt.counts, tt.window)
			if again := plan(rand.New(rand.NewPCG(7, 1)), tt.counts, tt.window); !slices.Equal(p, again) {
				t.Fatalf("the same seed planned %v, then %v", p, again)
			}
			if got := faultCounts(recordsOf(p)); got != tt.counts {
				t.Fatalf("planned %v faults, want %v", got, tt.counts)
			}
			for i, f := range p {
				if f.at < tt.window/10 || f.at > tt.window*9/10 {
					t.Errorf("fault %d at %s, outside [%s, %s]", i, f.at, tt.window/10, tt.window*9/10)
				}
				if i > 0 && f.at < p[i-1].at {
					t.Errorf("fault %d at %s before fault %d at %s", i, f.at, i-1, p[i-1].at)
				}
			}
		})
	}
}

func recordsOf(p []plannedFault) []faultRecord {
	out := make([]faultRecord, len(p))
	for i, f := range p {
		out[i] = faultRecord{kind: f.kind, at: f.at}
	}
	return out
}

func TestLedgerAccept(t *testing.T) {
	t.Parallel()
	doc := func(item int) request { return request{item: item, kind: kindDocument} }
	ev := func(item int, id string) request { return request{item: item, kind: kindEvent, eventID: id} }
	type accept struct {
		req request
		id  string
	}
	tests := []struct {
		name     string
		accepts  []accept
		entries  int
		problems int
	}{
		{"one each", []accept{{doc(1), "a"}, {doc(2), "b"}}, 2, 0},
		{"a repeat with the same id", []accept{{doc(1), "a"}, {doc(1), "a"}}, 1, 0},
		{"a repeat with another id", []accept{{doc(1), "a"}, {doc(1), "b"}}, 1, 1},
		{"two requests, one id", []accept{{doc(1), "a"}, {doc(2), "a"}}, 1, 1},
		{"event under its own id", []accept{{ev(1, "e1"), "e1"}}, 1, 0},
		{"event under another id", []accept{{ev(1, "e1"), "e2"}}, 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLedger()
			for _, a := range tt.accepts {
				_ = l.accept(a.req, a.id, time.Now())
			}
			entries, _, problems := l.snapshot()
			if len(entries) != tt.entries || len(problems) != tt.problems {
				t.Fatalf("%d entries and problems %q, want %d entries and %d problems", len(entries), problems, tt.entries, tt.problems)
			}
		})
	}
}

func TestBuildRequestIsSeeded(t *testing.T) {
	t.Parallel()
	draw := func() []request {
		r := rand.New(rand.NewPCG(42, 2))
		var out []request
		for i := range 200 {
			out = append(out, buildRequest(42, i, defaultMix, r))
		}
		return out
	}
	a, b := draw(), draw()
	var kinds [numKinds]int
	for i := range a {
		if a[i].kind != b[i].kind || a[i].filename != b[i].filename || a[i].eventID != b[i].eventID || a[i].key != b[i].key {
			t.Fatalf("request %d differs between two draws of one seed: %+v, %+v", i, a[i], b[i])
		}
		if a[i].kind == kindEvent && (!events.IsUUID(a[i].eventID) || !events.IsUUID(a[i].emailID)) {
			t.Fatalf("event %d has ids %q, %q", i, a[i].eventID, a[i].emailID)
		}
		kinds[a[i].kind]++
	}
	for k, n := range kinds {
		if n == 0 {
			t.Errorf("200 requests hold no %s", kind(k))
		}
	}
}

// TestPoisonKinds checks that every poison kind is what it claims to be:
// undecodable entries fail the wire decoding, decodable ones carry a valid
// envelope whose event cannot be decoded for the stream, and the dead
// letter of each names its marker.
func TestPoisonKinds(t *testing.T) {
	t.Parallel()
	const marker = "poison-1-1"
	for _, pk := range poisonKinds {
		for _, stream := range events.Types() {
			t.Run(pk.name+"/"+stream, func(t *testing.T) {
				t.Parallel()
				fields := map[string]string{}
				for k, v := range pk.fields(marker, stream) {
					switch v := v.(type) {
					case string:
						fields[k] = v
					case []byte:
						fields[k] = string(v)
					default:
						t.Fatalf("field %s of type %T", k, v)
					}
				}
				md := map[string]string{}
				uuid, hasUUID := fields[fieldUUID]
				decodable := hasUUID && uuid != "" && msgpack.Unmarshal([]byte(fields[fieldMetadata]), &md) == nil
				if decodable != pk.decodable {
					t.Fatalf("decodable = %v, want %v", decodable, pk.decodable)
				}
				dl := bus.DeadLetter{Raw: fields}
				if decodable {
					dl = bus.DeadLetter{EventID: uuid}
					if md[bus.MetaEventType] == stream {
						v := 0
						_, _ = fmt.Sscan(md[bus.MetaEventVersion], &v)
						if _, err := events.Decode(stream, v, []byte(fields[fieldPayload])); err == nil {
							t.Fatalf("the payload decodes as %s version %d", stream, v)
						}
					}
				}
				if got := poisonMarker(dl); got != marker {
					t.Fatalf("marker of the dead letter = %q, want %q", got, marker)
				}
			})
		}
	}
	if got := poisonMarker(bus.DeadLetter{EventID: "0190f0e0-0000-7000-8000-000000000001"}); got != "" {
		t.Fatalf("a real event's dead letter has marker %q", got)
	}
}

func oneTo(n int) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = time.Duration(i + 1)
	}
	return out
}

func TestPercentile(t *testing.T) {
	t.Parallel()
	d := func(n ...int) []time.Duration {
		out := make([]time.Duration, len(n))
		for i, v := range n {
			out[i] = time.Duration(v)
		}
		return out
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 0.5, 0},
		{"one", d(7), 0.99, 7},
		{"median of odd", d(1, 2, 3), 0.5, 2},
		{"p99 of 1..100", oneTo(100), 0.99, 99},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := percentile(tt.sorted, tt.p); got != tt.want {
				t.Fatalf("percentile(%v, %v) = %v, want %v", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}
