package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// entry is one stream entry as the subscriber hands it out.
type entry struct {
	id string
	// fields alternates field names and values in the entry's order. It is
	// nil for a pending entry whose data was deleted from the stream.
	fields []string
}

// valueMap returns the entry's fields as a map (dead letters keep them so).
func (e entry) valueMap() map[string]string {
	m := make(map[string]string, len(e.fields)/2)
	for i := 0; i+1 < len(e.fields); i += 2 {
		m[e.fields[i]] = e.fields[i+1]
	}
	return m
}

// size returns the bytes of the entry's field names and values.
func (e entry) size() int {
	n := 0
	for _, f := range e.fields {
		n += len(f)
	}
	return n
}

// streamEntries are the entries a read returned from one stream.
type streamEntries struct {
	stream  string
	entries []entry
}

// fromXStreams converts go-redis's read results.
func fromXStreams(res []redis.XStream) []streamEntries {
	out := make([]streamEntries, len(res))
	for i, st := range res {
		out[i] = streamEntries{stream: st.Stream, entries: fromXMessages(st.Messages)}
	}
	return out
}

func fromXMessages(msgs []redis.XMessage) []entry {
	out := make([]entry, len(msgs))
	for i, m := range msgs {
		out[i].id = m.ID
		if m.Values == nil {
			continue
		}
		out[i].fields = make([]string, 0, 2*len(m.Values))
		for k, v := range m.Values {
			s, ok := v.(string)
			if !ok {
				s = fmt.Sprint(v)
			}
			out[i].fields = append(out[i].fields, k, s)
		}
	}
	return out
}

// rawReader is a client that can hand over a reply unparsed, and whose read
// timeout is known. go-redis's *redis.Client is one.
type rawReader interface {
	DoRawWriteTo(ctx context.Context, w io.Writer, args ...any) *redis.RawWriteToCmd
	Options() *redis.Options
}

// maxKeptReadBuffer bounds the read buffer a subscription keeps between
// reads; a larger one (a batch of big entries) is let go.
const maxKeptReadBuffer = 4 << 20

// readNew reads new entries of streams (XREADGROUP ... STREAMS s1 s2 > >).
//
// A read returns up to COUNT entries per stream, each with a few fields.
// go-redis parses such a reply into a map and a dozen allocations per entry.
// Here the reply is copied raw into buf (reused from read to read) and
// parsed into strings that share one exact-size copy of it.
//
// go-redis reads the reply itself when the client cannot hand it over raw,
// when its read timeout leaves less than block+1s of margin (go-redis gives
// its own XReadGroup block+10s), and for a read that failed raw with
// anything but NOGROUP: go-redis then applies its own handling, such as
// dropping a connection that answers READONLY after a failover, or retrying
// a reset connection.
func readNew(ctx context.Context, client redis.UniversalClient, buf *bytes.Buffer, group, consumer string, streams []string, count int, block time.Duration) ([]streamEntries, error) {
	ids := make([]string, 0, 2*len(streams))
	ids = append(ids, streams...)
	for range streams {
		ids = append(ids, ">")
	}
	if rc, ok := client.(rawReader); ok {
		if rt := rc.Options().ReadTimeout; rt <= 0 || 2*block+time.Second < rt {
			res, err := readRaw(ctx, rc, buf, group, consumer, ids, count, block)
			if err == nil || isNoGroup(err) || ctx.Err() != nil {
				return res, err
			}
		}
	}
	res, err := client.XReadGroup(ctx, &redis.XReadGroupArgs{
		Group: group, Consumer: consumer, Streams: ids, Count: int64(count), Block: block,
	}).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return fromXStreams(res), nil
}

// readRaw is readNew's raw read; ids are the streams, then an id per stream.
func readRaw(ctx context.Context, rc rawReader, buf *bytes.Buffer, group, consumer string, ids []string, count int, block time.Duration) ([]streamEntries, error) {
	args := make([]any, 0, 9+len(ids))
	args = append(args, "XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block.Milliseconds(), "STREAMS")
	for _, id := range ids {
		args = append(args, id)
	}
	buf.Reset()
	defer func() {
		if buf.Cap() > maxKeptReadBuffer {
			*buf = bytes.Buffer{}
		}
	}()
	if err := rc.DoRawWriteTo(ctx, buf, args...).Err(); err != nil {
		return nil, err
	}
	return parseXRead(buf.Bytes())
}

// replyError is an error reply of Redis, such as NOGROUP.
type replyError string

func (e replyError) Error() string { return string(e) }

// RedisError marks it as a Redis reply (redis.Error).
func (replyError) RedisError() {}

var errBadReply = errors.New("malformed Redis reply")

// parseXRead parses an XREADGROUP reply in RESP2 (an array of [stream,
// entries] pairs) or RESP3 (a map of stream to entries). A null reply (the
// block timed out) has no entries. The strings share one copy of raw (each
// has its own in a reply larger than ownStringsAbove), so raw may be reused.
func parseXRead(raw []byte) ([]streamEntries, error) {
	r := resp{s: string(raw), own: len(raw) > ownStringsAbove}
	typ, n, rest, err := r.header()
	if err != nil {
		return nil, err
	}
	switch {
	case typ == '-' || typ == '!':
		return nil, r.errorReply(typ, n, rest)
	case n < 0:
		return nil, nil
	case typ != '*' && typ != '%':
		return nil, fmt.Errorf("%w: top level %q", errBadReply, typ)
	}
	out := make([]streamEntries, 0, n)
	// The fields of every entry share this slice; an entry keeps a capped
	// window of it, so later appends never reach into it.
	var fields []string
	for range n {
		if typ == '*' {
			if err := r.expectArray(2); err != nil {
				return nil, err
			}
		}
		stream, err := r.bulk()
		if err != nil {
			return nil, err
		}
		t, m, _, err := r.header()
		if err != nil {
			return nil, err
		}
		if t != '*' {
			return nil, fmt.Errorf("%w: entries of %s are %q", errBadReply, stream, t)
		}
		st := streamEntries{stream: stream, entries: make([]entry, 0, max(m, 0))}
		if fields == nil {
			fields = make([]string, 0, 8*max(m, 1))
		}
		for range m {
			if err := r.expectArray(2); err != nil {
				return nil, err
			}
			id, err := r.bulk()
			if err != nil {
				return nil, err
			}
			ft, k, _, err := r.header()
			if err != nil {
				return nil, err
			}
			e := entry{id: id}
			if ft != '*' && ft != '_' || k > 0 && k%2 != 0 {
				return nil, fmt.Errorf("%w: fields of %s are %q of %d", errBadReply, id, ft, k)
			}
			if k >= 0 {
				start := len(fields)
				for range k {
					v, err := r.bulk()
					if err != nil {
						return nil, err
					}
					fields = append(fields, v)
				}
				e.fields = fields[start:len(fields):len(fields)]
			}
			st.entries = append(st.entries, e)
		}
		out = append(out, st)
	}
	if r.i != len(r.s) {
		return nil, fmt.Errorf("%w: %d trailing bytes", errBadReply, len(r.s)-r.i)
	}
	return out, nil
}

// resp reads RESP values out of s.
type resp struct {
	s string
	i int
	// own gives each string its own copy, so that an entry kept alive (a
	// slow handler, an id stored somewhere) does not keep a large reply.
	own bool
}

// ownStringsAbove is the reply size from which parsed strings are copied
// out of the reply rather than shared.
const ownStringsAbove = 1 << 20

// line returns the next line without its CRLF.
func (r *resp) line() (string, error) {
	j := strings.IndexByte(r.s[r.i:], '\n')
	if j < 0 {
		return "", fmt.Errorf("%w: truncated", errBadReply)
	}
	j += r.i
	if j == r.i || r.s[j-1] != '\r' {
		return "", fmt.Errorf("%w: line not ended by CRLF", errBadReply)
	}
	l := r.s[r.i : j-1]
	r.i = j + 1
	return l, nil
}

// header reads a type line. n is its length (for arrays, maps, strings and
// blob errors), -1 for a null, 0 for other types; rest is the text after
// the type byte.
func (r *resp) header() (typ byte, n int, rest string, err error) {
	l, err := r.line()
	if err != nil {
		return 0, 0, "", err
	}
	if l == "" {
		return 0, 0, "", fmt.Errorf("%w: empty line", errBadReply)
	}
	typ, rest = l[0], l[1:]
	switch typ {
	case '*', '%', '$', '!':
		var ok bool
		if n, ok = parseLength(rest); !ok {
			return 0, 0, "", fmt.Errorf("%w: length %q", errBadReply, l)
		}
		if (typ == '*' || typ == '%') && n > len(r.s)-r.i {
			// Each element takes at least a byte: this reply is cut short
			// (and n must not size an allocation).
			return 0, 0, "", fmt.Errorf("%w: truncated", errBadReply)
		}
	case '_':
		n = -1
	}
	return typ, n, rest, nil
}

// errorReply returns the error reply whose header was just read: a simple
// error's text is on its line, a blob error's follows it.
func (r *resp) errorReply(typ byte, n int, rest string) error {
	if typ == '-' {
		return replyError(rest)
	}
	if n < 0 || n > len(r.s)-r.i-2 {
		return fmt.Errorf("%w: truncated", errBadReply)
	}
	msg := r.s[r.i : r.i+n]
	r.i += n + 2
	return replyError(msg)
}

func (r *resp) expectArray(n int) error {
	t, m, _, err := r.header()
	if err != nil {
		return err
	}
	if t != '*' || m != n {
		return fmt.Errorf("%w: want an array of %d, got %q of %d", errBadReply, n, t, m)
	}
	return nil
}

// bulk reads a bulk string.
func (r *resp) bulk() (string, error) {
	t, n, _, err := r.header()
	if err != nil {
		return "", err
	}
	if t != '$' || n < 0 {
		return "", fmt.Errorf("%w: want a string, got %q", errBadReply, t)
	}
	if n > len(r.s)-r.i-2 || r.s[r.i+n] != '\r' || r.s[r.i+n+1] != '\n' {
		return "", fmt.Errorf("%w: truncated string", errBadReply)
	}
	v := r.s[r.i : r.i+n]
	r.i += n + 2
	if r.own {
		v = strings.Clone(v)
	}
	return v, nil
}
