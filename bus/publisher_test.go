package bus_test

import (
	"bufio"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// namedClient returns a client whose connections carry a name of their
// own, so that a test can find them in CLIENT LIST.
func namedClient(t *testing.T) (*redis.Client, string) {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	opt.ClientName = "pub-" + strings.ReplaceAll(events.NewID(), "-", "")
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c, opt.ClientName
}

// clientConns lists the connections called name: id and "resp" (the
// protocol: go-redis speaks RESP3 by default, a connection of the
// publisher's own RESP2).
func clientConns(t *testing.T, admin *redis.Client, name string) []map[string]string {
	t.Helper()
	list, err := admin.ClientList(t.Context()).Result()
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]string
	sc := bufio.NewScanner(strings.NewReader(list))
	for sc.Scan() {
		c := map[string]string{}
		for _, f := range strings.Fields(sc.Text()) {
			k, v, _ := strings.Cut(f, "=")
			c[k] = v
		}
		if c["name"] == name {
			out = append(out, c)
		}
	}
	return out
}

// ownAndPooled counts the connections called name that the publisher
// opened itself and those of go-redis's pool.
func ownAndPooled(t *testing.T, admin *redis.Client, name string) (own, pooled int) {
	t.Helper()
	for _, c := range clientConns(t, admin, name) {
		if c["resp"] == "2" {
			own++
		} else {
			pooled++
		}
	}
	return own, pooled
}

func sentEvent() *events.EmailSent {
	return &events.EmailSent{EmailID: events.NewID(), To: "a@example.com", Attempts: 1, SentAt: time.Now().UTC()}
}

// TestPublishOverOwnConnection: appends go over the publisher's own
// connection, not the client's pool; a publish made once is refused the
// second time; when that connection breaks, the next publish goes through
// the pool (which dials again) and nothing is lost or doubled, and the one
// after it is back on a connection of the publisher's own. Close closes
// that connection.
func TestPublishOverOwnConnection(t *testing.T) {
	t.Parallel()
	rdb, name := namedClient(t)
	admin := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix, Pipelines: 1, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx := t.Context()
	stream := prefix + events.TypeEmailSent

	var want []string
	publish := func(opts ...bus.PublishOption) {
		t.Helper()
		id, err := pub.PublishEvent(ctx, sentEvent(), opts...)
		if err != nil {
			t.Fatalf("publish: %v", err)
		}
		want = append(want, id)
	}
	once := events.NewID()
	publish(bus.WithID(once), bus.WithOnce(time.Minute))
	if _, err := pub.PublishEvent(ctx, sentEvent(), bus.WithID(once), bus.WithOnce(time.Minute)); !errors.Is(err, bus.ErrAlreadyPublished) {
		t.Fatalf("second publish made once: %v, want ErrAlreadyPublished", err)
	}
	publish()
	if own, pooled := ownAndPooled(t, admin, name); own != 1 || pooled != 0 {
		t.Fatalf("%d own and %d pooled connections; want the publisher's own connection alone", own, pooled)
	}

	for _, c := range clientConns(t, admin, name) {
		if err := admin.Do(ctx, "CLIENT", "KILL", "ID", c["id"]).Err(); err != nil {
			t.Fatalf("CLIENT KILL ID %s: %v", c["id"], err)
		}
	}
	publish()
	if own, pooled := ownAndPooled(t, admin, name); own != 0 || pooled != 1 {
		t.Fatalf("after the break, %d own and %d pooled connections; want the publish sent through the pool", own, pooled)
	}
	publish()
	if own, _ := ownAndPooled(t, admin, name); own != 1 {
		t.Errorf("%d own connections after the next publish, want a new one", own)
	}

	entries, err := admin.XRange(ctx, stream, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Values["_watermill_message_uuid"].(string))
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("stream holds %q, want %q", got, want)
	}

	// Close closes the publisher's own connections (Redis notices on its
	// next turn).
	if err := pub.Close(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		own, _ := ownAndPooled(t, admin, name)
		if own == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d own connections after Close, want none", own)
			break
		}
	}
}

// TestPublishWithClosedClient: a publisher whose client is closed fails
// every publish with redis.ErrClosed, as go-redis does, and opens no
// connection of its own.
func TestPublishWithClosedClient(t *testing.T) {
	t.Parallel()
	rdb, name := namedClient(t)
	if err := rdb.Close(); err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: testenv.Prefix(t), Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	for range 2 {
		if _, err := pub.PublishEvent(t.Context(), sentEvent()); !errors.Is(err, redis.ErrClosed) {
			t.Errorf("publish: %v, want redis.ErrClosed", err)
		}
	}
	if own, pooled := ownAndPooled(t, testenv.Redis(t), name); own != 0 || pooled != 0 {
		t.Errorf("%d own and %d pooled connections, want none", own, pooled)
	}
}

// TestPublishErrorReplyFailsOnlyItsEvent: an append that Redis refuses
// (its stream's key holds a string) fails that event alone, with Redis's
// error; the others of the batch are written, and the connection stays in
// use.
func TestPublishErrorReplyFailsOnlyItsEvent(t *testing.T) {
	t.Parallel()
	rdb, name := namedClient(t)
	admin := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	ctx := t.Context()
	if err := admin.Set(ctx, prefix+events.TypeEmailSent, "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix, Pipelines: 1, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	requested := func() events.Event {
		return &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
	}
	res := pub.PublishBatch(ctx, []events.Event{requested(), sentEvent(), requested()}, nil)
	if res[1].Err == nil || !strings.Contains(res[1].Err.Error(), "WRONGTYPE") {
		t.Errorf("append to a string key: %v, want Redis's WRONGTYPE", res[1].Err)
	}
	for _, i := range []int{0, 2} {
		if res[i].Err != nil {
			t.Errorf("event %d: %v", i, res[i].Err)
		}
	}
	if _, err := pub.PublishEvent(context.Background(), requested()); err != nil {
		t.Fatalf("publish after the error reply: %v", err)
	}
	if n, err := admin.XLen(ctx, prefix+events.TypeEmailRequested).Result(); err != nil || n != 3 {
		t.Errorf("email.requested holds %d entries (%v), want 3", n, err)
	}
	if own, pooled := ownAndPooled(t, admin, name); own != 1 || pooled != 0 {
		t.Errorf("%d own and %d pooled connections; an error reply must not close the own connection", own, pooled)
	}
}
