package bus

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
)

// protoClient returns a client of the test Redis speaking RESP protocol
// proto, with the given read timeout (0: go-redis's default).
func protoClient(t *testing.T, proto int, readTimeout time.Duration) *redis.Client {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	opt.Protocol, opt.ReadTimeout = proto, readTimeout
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// xreadValues are entry values that a hand-written RESP parser could get
// wrong: empty, CRLF inside, binary, long, huge.
var xreadValues = []string{"", "plain", "with\r\nCRLF\r\n", "\x00\xff\x80binary", string(make([]byte, 70_000)),
	// With this one a read's reply exceeds ownStringsAbove.
	strings.Repeat("big", 200_000)}

// TestReadNewMatchesGoRedis reads the same entries with readNew (raw reply
// parsed here, or go-redis when the read timeout is too short) and with
// go-redis's XReadGroup, over RESP2 and RESP3: they must agree.
func TestReadNewMatchesGoRedis(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		proto       int
		readTimeout time.Duration
		raw         bool
	}{{2, 0, true}, {3, 0, true}, {3, 500 * time.Millisecond, false}} {
		t.Run(fmt.Sprintf("resp%d_raw=%v", tc.proto, tc.raw), func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			c := protoClient(t, tc.proto, tc.readTimeout)
			p := testenv.Prefix(t)
			streams := []string{p + "a", p + "b"}
			for _, s := range streams {
				for i, v := range xreadValues {
					if err := c.XAdd(ctx, &redis.XAddArgs{Stream: s, Values: []any{"k", v, "n", i, "other", "x"}}).Err(); err != nil {
						t.Fatal(err)
					}
				}
				for _, g := range []string{"ours", "theirs"} {
					if err := c.XGroupCreate(ctx, s, g, "0").Err(); err != nil {
						t.Fatal(err)
					}
				}
			}
			got, err := readNew(ctx, c, new(bytes.Buffer), "ours", "c", streams, 100, 50*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			want, err := c.XReadGroup(ctx, &redis.XReadGroupArgs{
				Group: "theirs", Consumer: "c", Streams: []string{streams[0], streams[1], ">", ">"}, Count: 100, Block: 50 * time.Millisecond,
			}).Result()
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) {
				t.Fatalf("readNew: %d streams, go-redis %d", len(got), len(want))
			}
			for i, st := range want {
				if got[i].stream != st.Stream || len(got[i].entries) != len(st.Messages) {
					t.Fatalf("stream %d: readNew %s with %d entries, go-redis %s with %d", i, got[i].stream, len(got[i].entries), st.Stream, len(st.Messages))
				}
				for j, m := range st.Messages {
					e := got[i].entries[j]
					wantValues := map[string]string{}
					for k, v := range m.Values {
						wantValues[k] = v.(string)
					}
					if e.id != m.ID || !reflect.DeepEqual(e.valueMap(), wantValues) {
						t.Fatalf("entry %s: readNew %s %q, go-redis %q", m.ID, e.id, e.valueMap(), wantValues)
					}
					if v := e.valueMap()["k"]; v != xreadValues[j] {
						t.Fatalf("entry %s: k = %q, want %q", m.ID, v, xreadValues[j])
					}
				}
			}
			if _, ok := any(c).(rawReader); !ok {
				t.Fatal("*redis.Client no longer offers raw replies; the fast path is dead")
			}

			// Nothing new: the block times out with a null reply.
			got, err = readNew(ctx, c, new(bytes.Buffer), "ours", "c", streams, 100, 20*time.Millisecond)
			if err != nil || len(got) != 0 {
				t.Fatalf("read with nothing new = %v, %v; want nothing, nil", got, err)
			}
			// A missing group is an error the read loop recognises.
			_, err = readNew(ctx, c, new(bytes.Buffer), "nobody", "c", streams, 100, 20*time.Millisecond)
			if !isNoGroup(err) {
				t.Fatalf("read of a missing group: %v; want NOGROUP", err)
			}
		})
	}
}

// TestParseXReadDeletedEntry parses a history read whose pending entry's
// data was deleted: Redis sends a null in place of its fields.
func TestParseXReadDeletedEntry(t *testing.T) {
	t.Parallel()
	for _, proto := range []int{2, 3} {
		t.Run(fmt.Sprint("resp", proto), func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			c := protoClient(t, proto, 0)
			s := testenv.Prefix(t) + "s"
			var ids []string
			for i := range 3 {
				id, err := c.XAdd(ctx, &redis.XAddArgs{Stream: s, Values: []any{"i", i}}).Result()
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, id)
			}
			if err := c.XGroupCreate(ctx, s, "g", "0").Err(); err != nil {
				t.Fatal(err)
			}
			if err := c.XReadGroup(ctx, &redis.XReadGroupArgs{Group: "g", Consumer: "c", Streams: []string{s, ">"}}).Err(); err != nil {
				t.Fatal(err)
			}
			if err := c.XDel(ctx, s, ids[1]).Err(); err != nil {
				t.Fatal(err)
			}
			var raw bytes.Buffer
			if err := c.DoRawWriteTo(ctx, &raw, "XREADGROUP", "GROUP", "g", "c", "STREAMS", s, "0").Err(); err != nil {
				t.Fatal(err)
			}
			got, err := parseXRead(raw.Bytes())
			if err != nil {
				t.Fatalf("parse %q: %v", raw.String(), err)
			}
			if len(got) != 1 || len(got[0].entries) != 3 {
				t.Fatalf("parsed %+v; want 3 entries of one stream", got)
			}
			for i, e := range got[0].entries {
				if e.id != ids[i] || (e.fields == nil) != (i == 1) {
					t.Fatalf("entry %d = %+v; want id %s, fields nil only for the deleted one", i, e, ids[i])
				}
			}
		})
	}
}

// TestParseXReadMalformed: a reply that is not what XREADGROUP sends is an
// error, never a panic or a partial result.
func TestParseXReadMalformed(t *testing.T) {
	t.Parallel()
	good := "*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n"
	if got, err := parseXRead([]byte(good)); err != nil || len(got) != 1 || got[0].entries[0].fields[1] != "v" {
		t.Fatalf("parse of a good reply = %+v, %v", got, err)
	}
	for i := range len(good) {
		if _, err := parseXRead([]byte(good[:i])); !errors.Is(err, errBadReply) {
			t.Errorf("truncated after %d bytes: err = %v; want errBadReply", i, err)
		}
	}
	for _, bad := range []string{
		"+OK\r\n", ":1\r\n", "*1\r\n$1\r\ns\r\n", "*1\r\n*2\r\n$1\r\ns\r\n$1\r\nx\r\n", "*x\r\n",
		"*1\r\n*2\r\n$5\r\ns\r\n*0\r\n", good + "extra",
		// Lengths that overflow an index.
		"*1\r\n*2\r\n$9223372036854775807\r\ns\r\n", "!9223372036854775807\r\nERR\r\n",
	} {
		if _, err := parseXRead([]byte(bad)); !errors.Is(err, errBadReply) {
			t.Errorf("parse %q: err = %v; want errBadReply", bad, err)
		}
	}
	err := func() error { _, err := parseXRead([]byte("-NOGROUP No such key\r\n")); return err }()
	var re redis.Error
	if !isNoGroup(err) || !errors.As(err, &re) {
		t.Fatalf("error reply: %v (%T); want a redis.Error starting NOGROUP", err, err)
	}
}

func FuzzParseXRead(f *testing.F) {
	f.Add([]byte("*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n"))
	f.Add([]byte("%1\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n_\r\n"))
	f.Add([]byte("_\r\n"))
	f.Add([]byte("!5\r\nERR x\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		res, err := parseXRead(raw)
		if err != nil && res != nil {
			t.Fatalf("error %v with a result", err)
		}
		for _, st := range res {
			for _, e := range st.entries {
				if len(e.fields)%2 != 0 {
					t.Fatalf("entry %s has %d fields", e.id, len(e.fields))
				}
			}
		}
	})
}

// TestParseXReadLargeReplyIsNotKept: an entry id kept from a large reply
// (a slow handler, an id stored somewhere) must not keep the whole reply.
// Not parallel: it measures the heap.
func TestParseXReadLargeReplyIsNotKept(t *testing.T) {
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapAlloc
	big := strings.Repeat("x", 1<<20)
	var b strings.Builder
	b.WriteString("*1\r\n*2\r\n$1\r\ns\r\n*4\r\n")
	for i := range 4 {
		fmt.Fprintf(&b, "*2\r\n$3\r\n%d-1\r\n*2\r\n$1\r\nk\r\n$%d\r\n%s\r\n", i, len(big), big)
	}
	raw := []byte(b.String())
	b.Reset()
	big = ""
	res, err := parseXRead(raw)
	if err != nil {
		t.Fatal(err)
	}
	raw = nil
	id := res[0].entries[0].id
	res = nil
	runtime.GC()
	runtime.ReadMemStats(&ms)
	if grew := int64(ms.HeapAlloc) - int64(before); grew > 1<<20 {
		t.Fatalf("keeping one entry id of a 4 MiB reply keeps %d bytes on the heap", grew)
	}
	if id != "0-1" {
		t.Fatalf("id = %q", id)
	}
}
