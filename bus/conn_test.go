package bus

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestReadConnSetsUpLikeGoRedis checks that the own read connection logs in
// as the client's user, in its database, under its client name.
func TestReadConnSetsUpLikeGoRedis(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	admin := testenv.Redis(t)
	p := testenv.Prefix(t)
	user, pass := strings.TrimSuffix(p, ":")+"-user", "s3cret"
	if err := admin.Do(ctx, "ACL", "SETUSER", user, "on", ">"+pass, "~*", "&*", "+@all").Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "ACL", "DELUSER", user) })

	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	opt.Username, opt.Password, opt.DB, opt.ClientName = user, pass, 3, p+"reader"
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	stream := p + "s"
	if err := c.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"k", "v"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := c.XGroupCreate(ctx, stream, "g", "0").Err(); err != nil {
		t.Fatal(err)
	}

	rc := newReadConn(c)
	if rc == nil {
		t.Fatal("no own read connection for a plain *redis.Client")
	}
	t.Cleanup(rc.close)
	if up, err := rc.ready(ctx); !up || err != nil {
		t.Fatalf("ready = %v, %v", up, err)
	}
	// The stream exists in database 3 only: reading it proves the SELECT.
	res, err := rc.exchange(ctx, nil, "g", "c", []string{stream, ">"}, 10, 10*time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || len(res[0].entries) != 1 || res[0].entries[0].valueMap()["k"] != "v" {
		t.Fatalf("read %+v; want the one entry", res)
	}
	list, err := admin.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range strings.Split(list, "\n") {
		if strings.Contains(l, " name="+opt.ClientName+" ") && strings.Contains(l, " cmd=xreadgroup ") {
			found = strings.Contains(l, " db=3 ") && strings.Contains(l, " user="+user+" ")
			if !found {
				t.Fatalf("own read connection is %q; want db=3 user=%s", l, user)
			}
		}
	}
	if !found {
		t.Fatalf("no connection named %s that read last in:\n%s", opt.ClientName, list)
	}

	// A wrong password fails the dial, and reads go through go-redis for
	// a while instead of dialling again each time.
	bad := *opt
	bad.Password = "wrong"
	bc := redis.NewClient(&bad)
	t.Cleanup(func() { _ = bc.Close() })
	brc := newReadConn(bc)
	if up, err := brc.ready(ctx); up || err == nil {
		t.Fatalf("ready with a wrong password = %v, %v; want an error", up, err)
	}
	if up, err := brc.ready(ctx); up || err != nil {
		t.Fatalf("ready right after a failed dial = %v, %v; want false, nil (no new dial)", up, err)
	}
}

// TestNoReadConnWhereGoRedisMustRead: clients whose setup the own
// connection cannot mirror read through go-redis.
func TestNoReadConnWhereGoRedisMustRead(t *testing.T) {
	t.Parallel()
	hook := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", OnConnect: func(context.Context, *redis.Conn) error { return nil }})
	cluster := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}})
	t.Cleanup(func() { _ = hook.Close(); _ = cluster.Close() })
	for name, c := range map[string]redis.UniversalClient{"OnConnect": hook, "cluster": cluster} {
		if newReadConn(c) != nil {
			t.Errorf("%s client got an own read connection", name)
		}
	}
}

// TestExchangeWritesAcksAheadOfTheRead: the acks passed to exchange are
// written (and retry entries deleted) before the read, in one round trip.
func TestExchangeWritesAcksAheadOfTheRead(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := testenv.Redis(t)
	p := testenv.Prefix(t)
	topic, retry := p+"s", RetryStream(p+"s", "g")
	add := func(stream string, n int) {
		for i := range n {
			if err := c.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"i", i}}).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	add(topic, 3)
	add(retry, 2)
	for _, s := range []string{topic, retry} {
		if err := c.XGroupCreate(ctx, s, "g", "0").Err(); err != nil {
			t.Fatal(err)
		}
	}
	rc := newReadConn(c)
	t.Cleanup(rc.close)
	if up, err := rc.ready(ctx); !up {
		t.Fatal(err)
	}
	ids := []string{topic, retry, ">", ">"}
	res, err := rc.exchange(ctx, nil, "g", "c", ids, 10, 10*time.Millisecond, func() { t.Error("ackWritten called without acks") })
	if err != nil {
		t.Fatal(err)
	}
	var acked []*delivery
	for _, st := range res {
		for _, e := range st.entries {
			acked = append(acked, &delivery{stream: st.stream, id: e.id, ofRetry: st.stream == retry})
		}
	}
	if len(acked) != 5 {
		t.Fatalf("first read got %d entries; want 5", len(acked))
	}
	// Interleave the streams: sortByStream groups them into one XACK each.
	acked[1], acked[4] = acked[4], acked[1]
	add(topic, 1)
	written := false
	res, err = rc.exchange(ctx, sortByStream(acked), "g", "c", ids, 10, 10*time.Millisecond, func() { written = true })
	if err != nil {
		t.Fatal(err)
	}
	if !written {
		t.Fatal("ackWritten not called")
	}
	if len(res) != 1 || res[0].stream != topic || len(res[0].entries) != 1 {
		t.Fatalf("second read got %+v; want the one new entry of %s", res, topic)
	}
	if n, err := c.XPending(ctx, topic, "g").Result(); err != nil || n.Count != 1 {
		t.Fatalf("pending on %s = %+v, %v; want only the new entry", topic, n, err)
	}
	if n, err := c.XPending(ctx, retry, "g").Result(); err != nil || n.Count != 0 {
		t.Fatalf("pending on %s = %+v, %v; want none", retry, n, err)
	}
	if n := c.XLen(ctx, retry).Val(); n != 0 {
		t.Fatalf("retry stream still holds %d entries; acked retry entries are deleted", n)
	}
	if n := c.XLen(ctx, topic).Val(); n != 4 {
		t.Fatalf("stream holds %d entries; want 4 (acks never delete from the stream itself)", n)
	}

	// A dead connection: the error says so, the acks are not reported as
	// written, and the next ready dials a new one at once.
	_ = rc.nc.Close()
	written = false
	if _, err := rc.exchange(ctx, acked[:1], "g", "c", ids, 10, 10*time.Millisecond, func() { written = true }); err == nil || written {
		t.Fatalf("exchange on a closed connection = %v, written %v; want an error, not written", err, written)
	}
	if rc.nc != nil {
		t.Fatal("a failed connection is kept")
	}
	if up, err := rc.ready(ctx); !up || err != nil {
		t.Fatalf("ready after a broken connection = %v, %v", up, err)
	}
	if _, err := rc.exchange(ctx, nil, "g", "c", ids, 10, 10*time.Millisecond, nil); err != nil {
		t.Fatal(err)
	}
	// An error reply to an ack (here WRONGTYPE: the key is a string)
	// leaves the acks unconfirmed, but the read's reply is still read and
	// the connection kept.
	notAStream := p + "string"
	if err := c.Set(ctx, notAStream, "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	add(topic, 1)
	written = false
	res, err = rc.exchange(ctx, []*delivery{{stream: notAStream, id: "1-1"}}, "g", "c", ids, 10, 10*time.Millisecond, func() { written = true })
	if err != nil || written {
		t.Fatalf("exchange with a failing ack = %v, written %v; want the read's result, not written", err, written)
	}
	if len(res) != 1 || len(res[0].entries) != 1 {
		t.Fatalf("read after a failing ack got %+v; want the one new entry", res)
	}
	if rc.nc == nil {
		t.Fatal("connection closed after an error reply to an ack")
	}
	// A missing group is NOGROUP, which the read loop handles; the
	// connection stays.
	if _, err := rc.exchange(ctx, nil, "nobody", "c", ids, 10, 10*time.Millisecond, nil); !isNoGroup(err) {
		t.Fatalf("read of a missing group: %v; want NOGROUP", err)
	}
	if rc.nc == nil {
		t.Fatal("connection closed after a NOGROUP reply")
	}
}

// TestFrameRejectsMalformedReplies: framing a reply off the socket fails
// cleanly on anything cut short or malformed, and never sizes a buffer
// from an absurd length.
func TestFrameRejectsMalformedReplies(t *testing.T) {
	t.Parallel()
	good := "*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n"
	// Framed as it comes off the socket in one read, and a byte a read,
	// which cuts every header and string short at each byte.
	frameWith := func(in string, chunked bool) (string, error) {
		var src io.Reader = strings.NewReader(in)
		if chunked {
			src = iotest.OneByteReader(src)
		}
		c := &readConn{src: src}
		err := c.readReply()
		return string(c.rbuf), err
	}
	frame := func(in string) (string, error) {
		got, err := frameWith(in, false)
		if got1, err1 := frameWith(in, true); got1 != got || (err1 == nil) != (err == nil) {
			t.Errorf("frame(%q) read whole = %q, %v; a byte a read = %q, %v", in, got, err, got1, err1)
		}
		return got, err
	}
	if got, err := frame(good + "+OK\r\n"); err != nil || got != good {
		t.Fatalf("frame(good) = %q, %v", got, err)
	}
	for i := range len(good) {
		if _, err := frame(good[:i]); err == nil {
			t.Errorf("frame of %q (cut at %d) succeeded", good[:i], i)
		}
	}
	long := "+" + strings.Repeat("x", 100) + "\r\n"
	if got, err := frame(long); err != nil || got != long {
		t.Fatalf("a long status line: %q, %v", got, err)
	}
	if _, err := frameWith("+"+strings.Repeat("x", maxHeaderLine+1), false); !errors.Is(err, errBadReply) {
		t.Fatalf("a header line over %d bytes: %v; want errBadReply", maxHeaderLine, err)
	}
	// Replies pipelined behind one another, each framed whole: small
	// ones, and one bigger than the read buffer that arrives behind them
	// (the buffer drops what was framed before it, then grows), read in
	// chunks as large as the buffer has room for, in halves of that, and
	// a byte at a time.
	big := "$" + strconv.Itoa(3*readBufSize) + "\r\n" + strings.Repeat("b", 3*readBufSize) + "\r\n"
	replies := []string{good, big, "+OK\r\n", "$0\r\n\r\n"}
	for range 2000 {
		replies = append(replies, ":1\r\n")
	}
	replies = append(replies, big, good)
	all := strings.Join(replies, "")
	for name, src := range map[string]io.Reader{
		"whole": strings.NewReader(all), "halves": iotest.HalfReader(strings.NewReader(all)),
		"bytes": iotest.OneByteReader(strings.NewReader(all)),
	} {
		c := &readConn{src: src}
		for i, want := range replies {
			if err := c.readReply(); err != nil || string(c.rbuf) != want {
				t.Fatalf("%s: pipelined reply %d = %.40q (%d bytes), %v; want %.40q (%d bytes)", name, i, c.rbuf, len(c.rbuf), err, want, len(want))
			}
		}
		if err := c.readReply(); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("%s: reading past the last reply: %v; want io.ErrUnexpectedEOF", name, err)
		}
	}
	for _, in := range []string{"?1\r\n", "$x\r\n", "*-2\r\n", "$1\n", "\r\n", "$99999999999\r\n", fmt.Sprintf("$%d\r\n", maxBulkLen+1)} {
		if _, err := frame(in); err == nil {
			t.Errorf("frame(%q) succeeded", in)
		}
	}
	// RESP3 shapes a server may send frame whole too.
	for _, in := range []string{"%1\r\n$1\r\na\r\n:1\r\n", "_\r\n", "~2\r\n#t\r\n,1.5\r\n", "!3\r\nERR\r\n", "*-1\r\n"} {
		if got, err := frame(in); err != nil || got != in {
			t.Errorf("frame(%q) = %q, %v", in, got, err)
		}
	}
	c := &readConn{rbuf: []byte("-NOGROUP no such group\r\n")}
	if err := c.replyErr(); !isNoGroup(err) {
		t.Fatalf("replyErr = %v; want NOGROUP", err)
	}
	c.rbuf = []byte(":1\r\n")
	if err := c.replyErr(); err != nil {
		t.Fatalf("replyErr(:1) = %v", err)
	}
}

// TestReadBufferIsTrimmed: a connection lets go of a read buffer that one
// large reply grew, once nothing in it is left to frame, and not before.
func TestReadBufferIsTrimmed(t *testing.T) {
	t.Parallel()
	big := "$" + strconv.Itoa(maxKeptReadBuffer) + "\r\n" + strings.Repeat("b", maxKeptReadBuffer) + "\r\n"
	c := &readConn{src: strings.NewReader(big + "+OK\r\n")}
	if err := c.readReply(); err != nil || len(c.rbuf) != len(big) {
		t.Fatalf("big reply: %d bytes, %v", len(c.rbuf), err)
	}
	if left := len(c.in) - c.next; left != len("+OK\r\n") {
		t.Fatalf("%d bytes read past the big reply; the test wants the next reply read with it", left)
	}
	c.trim() // the next reply is still in the buffer: kept
	if err := c.readReply(); err != nil || string(c.rbuf) != "+OK\r\n" {
		t.Fatalf("reply after the big one = %q, %v", c.rbuf, err)
	}
	c.trim()
	if cap(c.in) > maxKeptReadBuffer {
		t.Fatalf("kept a read buffer of %d bytes after its replies were framed", cap(c.in))
	}
}
