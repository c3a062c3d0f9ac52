package bus

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/testenv"
)

// These tests call flushOwn on a batch they build, so that every request is
// in one write, as under load.

func newOwnPublisher(t *testing.T, rdb *redis.Client) (*Publisher, *readConn) {
	t.Helper()
	p, err := NewPublisher(PublisherConfig{Client: rdb, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	conn := newReadConn(rdb)
	if conn == nil {
		t.Fatal("no own connection for a plain client")
	}
	t.Cleanup(conn.close)
	return p, conn
}

func appendReq(stream string) *pubReq {
	return &pubReq{ctx: context.Background(), stream: stream, fields: []any{fieldUUID, "id", fieldPayload, []byte("{}")}, done: make(chan struct{}, 1)}
}

// finished reports whether r was handed back to its caller.
func finished(r *pubReq) bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// TestFlushOwnErrorReplyMidBatch: an append Redis refuses (its key holds a
// string) fails alone; the appends around it in the same write succeed.
func TestFlushOwnErrorReplyMidBatch(t *testing.T) {
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	if err := rdb.Set(t.Context(), prefix+"str", "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	p, conn := newOwnPublisher(t, rdb)
	live := []*pubReq{appendReq(prefix + "s"), appendReq(prefix + "str"), appendReq(prefix + "s")}
	if rest := p.flushOwn(live, conn, time.Now().Add(10*time.Second)); len(rest) != 0 {
		t.Fatalf("%d requests left for go-redis, want none", len(rest))
	}
	for i, r := range live {
		if !finished(r) {
			t.Fatalf("request %d not finished", i)
		}
	}
	if live[1].err == nil || !strings.HasPrefix(live[1].err.Error(), "WRONGTYPE") {
		t.Errorf("append to a string: %v, want WRONGTYPE", live[1].err)
	}
	for _, i := range []int{0, 2} {
		if live[i].err != nil || live[i].id == "" {
			t.Errorf("request %d: id %q, %v", i, live[i].id, live[i].err)
		}
	}
	if conn.nc == nil {
		t.Error("an error reply closed the connection")
	}
}

// TestFlushOwnReadOnlyGoesToGoRedis: after a failover that the client's
// address hides (here its Dialer), the own connection still reaches the
// old master, now a replica, which answers READONLY. Those appends were
// not run: they are left for go-redis, which dials the new master, and the
// own connection is closed and not dialled again for a while.
func TestFlushOwnReadOnlyGoesToGoRedis(t *testing.T) {
	master := testenv.Redis(t)
	replica, err := embedded.StartRedis(t.Context(), embedded.RedisConfig{Dir: filepath.Join(t.TempDir(), "replica"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Skipf("second redis-server: %v", err)
	}
	t.Cleanup(func() { _ = replica.Stop(context.Background()) })
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	masterAddr := opt.Addr
	host, port, _ := net.SplitHostPort(masterAddr)
	ro := redis.NewClient(&redis.Options{Addr: replica.Addr()})
	defer ro.Close()
	if err := ro.Do(t.Context(), "REPLICAOF", host, port).Err(); err != nil {
		t.Fatal(err)
	}
	// The first dial (the own connection's) reaches the replica, the
	// later ones the master.
	var dials atomic.Int32
	opt.Dialer = func(ctx context.Context, network, _ string) (net.Conn, error) {
		addr := masterAddr
		if dials.Add(1) == 1 {
			addr = replica.Addr()
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	p, conn := newOwnPublisher(t, rdb)
	stream := testenv.Prefix(t) + "s"
	live := []*pubReq{appendReq(stream), appendReq(stream)}
	rest := p.flushOwn(live, conn, time.Now().Add(10*time.Second))
	if len(rest) != 2 {
		t.Fatalf("%d requests left for go-redis, want both (READONLY)", len(rest))
	}
	for i, r := range live {
		if finished(r) {
			t.Errorf("request %d finished with %v; want it left for go-redis", i, r.err)
		}
	}
	if conn.nc != nil || conn.dialDue() {
		t.Error("the own connection is still used after READONLY")
	}
	// The full flush sends them through go-redis, to the master.
	live = []*pubReq{appendReq(stream), appendReq(stream)}
	p.flush(live, nil, conn)
	for i, r := range live {
		if !finished(r) || r.err != nil {
			t.Errorf("request %d through go-redis: finished %v, %v", i, finished(r), r.err)
		}
	}
	if n, err := master.XLen(t.Context(), stream).Result(); err != nil || n != 2 {
		t.Errorf("master's stream holds %d entries (%v), want 2", n, err)
	}
}

// cutProxy forwards connections to addr. On the first one it passes on
// only the first reply (two lines: "$n" and the id) and then closes it, as
// a connection that breaks mid-batch; later ones it forwards whole.
func cutProxy(t *testing.T, addr string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var first atomic.Bool
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() { _, _ = io.Copy(s, c); _ = s.Close() }()
			if first.CompareAndSwap(false, true) {
				go func() {
					br := bufio.NewReader(s)
					for range 2 {
						line, err := br.ReadBytes('\n')
						if err != nil {
							break
						}
						_, _ = c.Write(line)
					}
					_ = c.Close()
					_ = s.Close()
				}()
				continue
			}
			go func() { _, _ = io.Copy(c, s); _ = c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// TestFlushOwnBreakMidBatch: the connection breaks after the first reply.
// The first append is finished with its id; the others, which Redis may
// have run, are left for go-redis to send again (at least once), or, if the
// client's retries are off, fail with the error, which MaybeWritten says
// may have been written.
func TestFlushOwnBreakMidBatch(t *testing.T) {
	for _, retries := range []int{0, -1} {
		t.Run(map[int]string{0: "retries on", -1: "retries off"}[retries], func(t *testing.T) {
			opt, err := redis.ParseURL(testenv.RedisURL(t))
			if err != nil {
				t.Fatal(err)
			}
			opt.Addr = cutProxy(t, opt.Addr)
			opt.MaxRetries = retries
			rdb := redis.NewClient(opt)
			defer rdb.Close()
			p, conn := newOwnPublisher(t, rdb)
			stream := testenv.Prefix(t) + "s"
			live := []*pubReq{appendReq(stream), appendReq(stream), appendReq(stream)}
			rest := p.flushOwn(live, conn, time.Now().Add(10*time.Second))
			if !finished(live[0]) || live[0].err != nil || live[0].id == "" {
				t.Fatalf("first append: id %q, %v", live[0].id, live[0].err)
			}
			if conn.nc != nil {
				t.Error("the broken connection is still open")
			}
			if retries == 0 {
				if len(rest) != 2 || rest[0] != live[1] || rest[1] != live[2] {
					t.Fatalf("left %d requests for go-redis, want the two unanswered", len(rest))
				}
				return
			}
			if len(rest) != 0 {
				t.Fatalf("left %d requests for go-redis with its retries off", len(rest))
			}
			for i, r := range live[1:] {
				if !finished(r) || r.err == nil || !MaybeWritten(r.err) {
					t.Errorf("request %d: finished %v, %v; want an error that may have been written", i+1, finished(r), r.err)
				}
			}
		})
	}
}

// TestFlushOwnOnceSentAgain: flushOwn appended a publish made once, but
// its reply was lost (the connection broke after Redis ran it), so go-redis
// sends the same request again. That succeeds as the first run did and
// appends nothing more; another publish with the id is refused.
func TestFlushOwnOnceSentAgain(t *testing.T) {
	rdb := testenv.Redis(t)
	p, conn := newOwnPublisher(t, rdb)
	stream := testenv.Prefix(t) + "s"
	once := func() *pubReq {
		r := appendReq(stream)
		r.onceKey, r.onceTTL, r.onceNonce = OnceKey(stream, "id"), time.Minute, p.onceNonce()
		return r
	}
	r := once()
	rest := p.flushOwn([]*pubReq{r}, conn, time.Now().Add(10*time.Second))
	if done := finished(r); len(rest) != 0 || !done || r.err != nil {
		t.Fatalf("over the own connection: %d left, finished %v, %v; want it published", len(rest), done, r.err)
	}
	p.flush([]*pubReq{r}, nil, nil) // through go-redis, with the same nonce
	if done := finished(r); !done || r.err != nil {
		t.Errorf("sent again: finished %v, %v; want the success of its first run", done, r.err)
	}
	other := once()
	p.flush([]*pubReq{other}, nil, nil)
	if done := finished(other); !done || !errors.Is(other.err, ErrAlreadyPublished) {
		t.Errorf("another publish with the id: finished %v, %v; want ErrAlreadyPublished", done, other.err)
	}
	if n, err := rdb.XLen(t.Context(), stream).Result(); err != nil || n != 1 {
		t.Errorf("stream holds %d entries (%v), want 1", n, err)
	}
}
