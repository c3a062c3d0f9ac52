package handlers_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"
	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMain stops the shared Redis before goleak looks. Publishers, routers,
// Redis clients, Mailpit connections and HTTP test servers are all closed by
// the cleanups of the tests that made them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(testenv.Wrap(m)) }

// discard is the logger of handlers, routers and publishers in tests: the
// tests look at what was published, not at what was logged.
var discard = slog.New(slog.DiscardHandler)

// liveness bounds waits for something that happens within milliseconds on
// an idle machine; it is only there so that a broken test ends.
const liveness = 30 * time.Second

// busFixture is one test's Redis, stream prefix and real publisher.
type busFixture struct {
	rdb    *redis.Client
	prefix string
	pub    *bus.Publisher
}

func newBus(t *testing.T) *busFixture {
	t.Helper()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix, Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return &busFixture{rdb: rdb, prefix: prefix, pub: pub}
}

// entry is one published event as it lies in its stream.
type entry struct {
	ID      string            // the event id (the Watermill message UUID)
	Meta    map[string]string // the envelope
	Payload []byte
}

// entries reads the stream of eventType with XRANGE.
func (f *busFixture) entries(t *testing.T, eventType string) []entry {
	t.Helper()
	xs, err := f.rdb.XRange(context.Background(), f.prefix+eventType, "-", "+").Result()
	if err != nil {
		t.Fatalf("XRANGE %s: %v", eventType, err)
	}
	out := make([]entry, 0, len(xs))
	for _, x := range xs {
		e := entry{Meta: map[string]string{}}
		e.ID, _ = x.Values["_watermill_message_uuid"].(string)
		if md, _ := x.Values["metadata"].(string); md != "" {
			if err := msgpack.Unmarshal([]byte(md), &e.Meta); err != nil {
				t.Fatalf("%s entry %s: metadata: %v", eventType, x.ID, err)
			}
		}
		p, _ := x.Values["payload"].(string)
		e.Payload = []byte(p)
		out = append(out, e)
	}
	return out
}

// waitEntries waits until the stream of eventType holds at least n entries
// and returns them.
func (f *busFixture) waitEntries(t *testing.T, eventType string, n int) []entry {
	t.Helper()
	deadline := time.Now().Add(liveness)
	for {
		es := f.entries(t, eventType)
		if len(es) >= n {
			return es
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d %s entries after %s, want %d", len(es), eventType, liveness, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitAcked waits until the group has acked every entry of the stream of
// eventType and of its retry stream: nothing is pending any more.
func (f *busFixture) waitAcked(t *testing.T, eventType, group string) {
	t.Helper()
	stream := f.prefix + eventType
	deadline := time.Now().Add(liveness)
	for {
		n := int64(0)
		for _, s := range []string{stream, bus.RetryStream(stream, group)} {
			pending, err := f.rdb.XPending(t.Context(), s, group).Result()
			if err != nil {
				t.Fatalf("XPENDING %s: %v", s, err)
			}
			n += pending.Count
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d %s entries still pending after %s", n, eventType, liveness)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// decode unmarshals the payload of e into a new T.
func decode[T any](t *testing.T, e entry) *T {
	t.Helper()
	v := new(T)
	if err := json.Unmarshal(e.Payload, v); err != nil {
		t.Fatalf("decode %s: %v", e.Payload, err)
	}
	return v
}

// checkEnvelope checks that e is the follow-up event wantID of type typ,
// caused by the handled event cause.
func checkEnvelope(t *testing.T, e entry, typ, wantID string, cause events.Envelope) {
	t.Helper()
	if e.ID != wantID || e.Meta[bus.MetaEventID] != wantID {
		t.Errorf("%s id = %s (metadata %s), want the derived id %s", typ, e.ID, e.Meta[bus.MetaEventID], wantID)
	}
	if e.Meta[bus.MetaEventType] != typ {
		t.Errorf("event_type = %q, want %q", e.Meta[bus.MetaEventType], typ)
	}
	if e.Meta[bus.MetaCausationID] != cause.ID {
		t.Errorf("%s causation_id = %q, want the handled event %s", typ, e.Meta[bus.MetaCausationID], cause.ID)
	}
	if e.Meta[bus.MetaCorrelationID] != cause.CorrelationID {
		t.Errorf("%s correlation_id = %q, want %q", typ, e.Meta[bus.MetaCorrelationID], cause.CorrelationID)
	}
}

// handling returns a context as the router gives a handler for an event
// of type typ with a new id, and that envelope.
func handling(t *testing.T, typ string) (context.Context, events.Envelope) {
	t.Helper()
	env := events.Envelope{
		ID:            events.NewID(),
		Type:          typ,
		Version:       1,
		OccurredAt:    time.Now(),
		CorrelationID: events.NewID(),
		Source:        "test",
		Attempt:       1,
	}
	return bus.WithEnvelope(t.Context(), env), env
}

// newBlobs returns a blob.Dir in a temporary folder.
func newBlobs(t *testing.T) *blob.Dir {
	t.Helper()
	d, err := blob.NewDir(blob.DirConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// refusedAddr is an address where nothing listens, so a connection is
// refused at once: port 1 (tcpmux) is privileged and unused. A port taken
// from a listener and closed again may meanwhile be another test's.
const refusedAddr = "127.0.0.1:1"

// runRouter runs r until the test ends, and waits for it to run.
func runRouter(t *testing.T, r *bus.Router) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("router: %v", err)
		}
	})
	select {
	case <-r.Running():
	case err := <-done:
		done <- err
		t.Fatalf("router stopped while starting: %v", err)
	case <-time.After(liveness):
		t.Fatalf("router not running after %s", liveness)
	}
}

// refusingSMTP starts an SMTP server on 127.0.0.1 that greets, answers
// EHLO, and answers MAIL FROM with reply (say "550 5.7.1 sender
// rejected"), as a relay that refuses this service's sender address. It
// returns the server's smtp:// URL.
func refusingSMTP(t *testing.T, reply string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(liveness))
				r := bufio.NewReader(c)
				fmt.Fprint(c, "220 refusing.test ESMTP\r\n")
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					switch cmd := strings.ToUpper(strings.TrimSpace(line)); {
					case strings.HasPrefix(cmd, "EHLO"), strings.HasPrefix(cmd, "HELO"):
						fmt.Fprint(c, "250 refusing.test\r\n")
					case strings.HasPrefix(cmd, "MAIL FROM"):
						fmt.Fprint(c, reply+"\r\n")
					case cmd == "QUIT":
						fmt.Fprint(c, "221 bye\r\n")
						return
					default:
						fmt.Fprint(c, "250 ok\r\n")
					}
				}
			}()
		}
	}()
	return "smtp://" + l.Addr().String() + "?tls=none"
}
