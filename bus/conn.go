package bus

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// readConn is a connection of our own to Redis, for a read lane (a
// subscription reads in two lanes, see subscription.lanes) or a
// Publisher's worker (see Publisher.flushOwn). For a lane, each round trip
// writes the acks gathered since the last read ahead of the next
// XREADGROUP, in one write; the acks' replies are read (and their entries
// finished) before the read's reply, which is framed straight off the
// socket and parsed by parseXRead. That saves the ack loop's own round trip
// and go-redis's per-command work (a LimitedReader per bulk string of a raw
// reply, an interface per acked id).
//
// It speaks RESP2 and sets up the connection as go-redis would for the
// common options: the client's Dialer (TLS, Sentinel's master lookup),
// credentials, DB and client name. A client with options it cannot mirror
// (an OnConnect hook, streaming credentials, a Limiter) or that is not a
// single-node *redis.Client gets no readConn: its reads and appends go
// through go-redis. After a failed dial, they go through go-redis for a
// while. The client's hooks do not see the commands sent over a readConn.
type readConn struct {
	opt  *redis.Options
	nc   net.Conn
	src  io.Reader // nc, which replies are read from
	wbuf []byte
	// in holds what was read from src: in[:next] is framed (done with
	// once the next reply is framed), in[next:] not yet (replies
	// pipelined after the last one framed).
	in   []byte
	next int
	// rbuf is the last reply framed: a window of in, valid until the
	// next readReply.
	rbuf []byte
	// stack is readReply's count of elements still to frame at each
	// level of nesting, kept for its storage.
	stack []int
	// noDialUntil: after a failed dial, reads go through go-redis until
	// then.
	noDialUntil time.Time
	// warned is set once a failed dial is logged as a warning, until a
	// dial succeeds.
	warned bool
}

// redialAfter is how long a subscription reads through go-redis after its
// own connection could not be set up.
const redialAfter = 5 * time.Second

// newReadConn returns a readConn for client, or nil when client's reads
// must go through go-redis.
func newReadConn(client redis.UniversalClient) *readConn {
	c, ok := client.(interface{ Options() *redis.Options })
	if !ok {
		return nil
	}
	opt := c.Options()
	if opt == nil || opt.Dialer == nil || opt.OnConnect != nil || opt.StreamingCredentialsProvider != nil || opt.Limiter != nil {
		return nil
	}
	return &readConn{opt: opt}
}

// ready reports whether the connection is up, dialling it if it is not
// and a dial is due.
func (c *readConn) ready(ctx context.Context) (bool, error) {
	if c.nc != nil {
		return true, nil
	}
	if time.Now().Before(c.noDialUntil) {
		return false, nil
	}
	if err := c.dial(ctx); err != nil {
		c.backOff()
		return false, err
	}
	c.warned = false
	return true, nil
}

// readyLogged is ready for a caller that goes through go-redis when the
// connection is not up: a failed dial is logged with msg and attrs, as a
// warning once per failure streak (during a Redis outage the go-redis
// errors say enough) and at debug level after that.
func (c *readConn) readyLogged(ctx context.Context, log *slog.Logger, msg string, attrs ...any) bool {
	up, err := c.ready(ctx)
	if err != nil && ctx.Err() == nil {
		level := slog.LevelDebug
		if !c.warned {
			level, c.warned = slog.LevelWarn, true
		}
		log.Log(ctx, level, msg, append(attrs, "error", err, "retry_in", redialAfter)...)
	}
	return up
}

// backOff leaves the connection down, and the caller on go-redis, for
// redialAfter.
func (c *readConn) backOff() {
	c.close()
	c.noDialUntil = time.Now().Add(redialAfter)
}

// dialDue reports whether ready would dial now.
func (c *readConn) dialDue() bool {
	return c.nc == nil && !time.Now().Before(c.noDialUntil)
}

func (c *readConn) dial(ctx context.Context) error {
	dctx, cancel := context.WithTimeout(ctx, c.opt.DialTimeout)
	defer cancel()
	nc, err := c.opt.Dialer(dctx, c.opt.Network, c.opt.Addr)
	if err != nil {
		return err
	}
	// The read buffer is empty: a connection is dialled only when it has
	// none, first or after close.
	c.nc, c.src = nc, nc
	if err := c.handshake(dctx); err != nil {
		c.close()
		return fmt.Errorf("set up connection: %w", err)
	}
	return nil
}

// handshake authenticates and selects the database, as go-redis does for
// a RESP2 connection.
func (c *readConn) handshake(ctx context.Context) error {
	opt := c.opt
	user, pass := opt.Username, opt.Password
	switch {
	case opt.CredentialsProviderContext != nil:
		var err error
		if user, pass, err = opt.CredentialsProviderContext(ctx); err != nil {
			return err
		}
	case opt.CredentialsProvider != nil:
		user, pass = opt.CredentialsProvider()
	}
	c.wbuf = c.wbuf[:0]
	n := 0
	if pass != "" {
		if user != "" {
			c.command("AUTH", user, pass)
		} else {
			c.command("AUTH", pass)
		}
		n++
	}
	if opt.DB != 0 {
		c.command("SELECT", strconv.Itoa(opt.DB))
		n++
	}
	if opt.ClientName != "" {
		c.command("CLIENT", "SETNAME", opt.ClientName)
		n++
	}
	if n == 0 {
		return nil
	}
	dl, _ := ctx.Deadline()
	if err := c.send(dl, dl); err != nil {
		return err
	}
	for range n {
		if err := c.readReply(); err != nil {
			return err
		}
		if err := c.replyErr(); err != nil {
			return err
		}
	}
	return nil
}

func (c *readConn) close() {
	if c.nc != nil {
		_ = c.nc.Close()
		c.nc = nil
	}
	if cap(c.in) > maxKeptReadBuffer {
		c.in = nil
	}
	c.in, c.next, c.rbuf = c.in[:0], 0, nil
}

// command appends a command to the write buffer.
func (c *readConn) command(args ...string) {
	c.array(len(args))
	for _, a := range args {
		c.bulk(a)
	}
}

func (c *readConn) array(n int) {
	c.wbuf = append(c.wbuf, '*')
	c.wbuf = strconv.AppendInt(c.wbuf, int64(n), 10)
	c.wbuf = append(c.wbuf, '\r', '\n')
}

func (c *readConn) bulk(s string) { c.wbuf = appendBulk(c.wbuf, s) }

func appendBulk[T string | []byte](b []byte, s T) []byte {
	b = append(b, '$')
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, '\r', '\n')
	b = append(b, s...)
	return append(b, '\r', '\n')
}

func (c *readConn) bulkInt(n int64) {
	var b [20]byte
	c.bulk(string(strconv.AppendInt(b[:0], n, 10)))
}

// send writes the write buffer, and sets the deadline of the replies.
func (c *readConn) send(writeBy, readBy time.Time) error {
	if err := c.nc.SetWriteDeadline(writeBy); err != nil {
		return err
	}
	if err := c.nc.SetReadDeadline(readBy); err != nil {
		return err
	}
	_, err := c.nc.Write(c.wbuf)
	if cap(c.wbuf) > maxKeptReadBuffer {
		c.wbuf = nil
	}
	return err
}

// readBufSize is the size of a connection's read buffer, and of each read
// from the socket: a batch of a hundred entries of a few hundred bytes
// comes in one or two reads.
const readBufSize = 64 << 10

// maxHeaderLine bounds a header line (type, length, or a simple string
// such as an error message).
const maxHeaderLine = 64 << 10

// readReply reads one whole reply, nested values included, into rbuf.
//
// Replies are read off the socket in large chunks into in and framed
// there: a header line is found with one IndexByte, and a bulk string is
// skipped by its length, not read. What follows the reply (the next
// pipelined reply) stays in in for the next call.
func (c *readConn) readReply() error {
	c.rbuf = nil
	if c.next == len(c.in) {
		// Everything read was framed: start the buffer over.
		c.in, c.next = c.in[:0], 0
	}
	// The reply starts at base; replies pipelined behind it are framed
	// where they lie, so that many small ones are not moved each time.
	base, pos := c.next, c.next
	stack := append(c.stack[:0], 1) // one value, the reply
	defer func() { c.stack = stack[:0] }()
	for len(stack) > 0 {
		if stack[len(stack)-1] == 0 {
			stack = stack[:len(stack)-1]
			continue
		}
		end, more, err := frameOne(c.in, pos, &stack)
		if err != nil {
			return err
		}
		if more {
			moved, err := c.fill(base)
			if err != nil {
				return err
			}
			base, pos = base-moved, pos-moved
			continue
		}
		pos = end
	}
	c.rbuf, c.next = c.in[base:pos:pos], pos
	return nil
}

// trim lets go of a read buffer grown past maxKeptReadBuffer by a large
// reply, once every reply in it was framed: a connection waiting for its
// next round trip keeps no more than that.
func (c *readConn) trim() {
	if cap(c.in) > maxKeptReadBuffer && c.next == len(c.in) {
		c.in, c.next, c.rbuf = nil, 0, nil
	}
}

// frameOne frames the value whose header starts at in[pos]: it returns
// the end of its header, or of a bulk string its end, and counts it off
// the top of stack, pushing the elements of an aggregate. more means in
// does not hold the whole header or string yet; nothing is changed then.
func frameOne(in []byte, pos int, stack *[]int) (end int, more bool, err error) {
	nl := bytes.IndexByte(in[pos:], '\n')
	if nl < 0 {
		if len(in)-pos > maxHeaderLine {
			return 0, false, fmt.Errorf("%w: header line too long", errBadReply)
		}
		return 0, true, nil
	}
	line := in[pos : pos+nl+1]
	end = pos + nl + 1
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return 0, false, fmt.Errorf("%w: bad line %q", errBadReply, truncate(string(line), 40))
	}
	typ := line[0]
	n := 0
	switch typ {
	case '+', '-', ':', '_', ',', '#', '(':
	case '$', '!', '=', '*', '%', '~', '>':
		var ok bool
		if n, ok = parseLength(line[1 : len(line)-2]); !ok {
			return 0, false, fmt.Errorf("%w: length %q", errBadReply, truncate(string(line), 40))
		}
	default:
		return 0, false, fmt.Errorf("%w: type %q", errBadReply, typ)
	}
	switch typ {
	case '$', '!', '=':
		if n > maxBulkLen {
			return 0, false, fmt.Errorf("%w: string of %d bytes", errBadReply, n)
		}
		if n >= 0 {
			if len(in)-end < n+2 {
				return 0, true, nil
			}
			end += n + 2
			if in[end-2] != '\r' || in[end-1] != '\n' {
				return 0, false, fmt.Errorf("%w: string of %d bytes not followed by CRLF", errBadReply, n)
			}
		}
	case '%':
		n *= 2
	}
	s := *stack
	s[len(s)-1]--
	if n > 0 && (typ == '*' || typ == '%' || typ == '~' || typ == '>') {
		s = append(s, n)
	}
	*stack = s
	return end, false, nil
}

// parseLength parses the length of a header line: -1 (a null) or a
// whole number of at most 18 digits.
func parseLength[T string | []byte](b T) (int, bool) {
	if len(b) == 2 && b[0] == '-' && b[1] == '1' {
		return -1, true
	}
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	n := 0
	for i := range len(b) {
		c := b[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// fill reads more of the connection into in. The reply being framed
// starts at base: when in is nearly full, what comes before it is dropped
// (in moves down by moved bytes), and in grows only if that leaves too
// little room.
func (c *readConn) fill(base int) (moved int, err error) {
	if cap(c.in)-len(c.in) < 4<<10 {
		if base > 0 {
			c.in = c.in[:copy(c.in, c.in[base:])]
			moved = base
		}
		if cap(c.in)-len(c.in) < 4<<10 {
			// A big reply doubles the buffer.
			c.in = slices.Grow(c.in, max(readBufSize, len(c.in)))
		}
	}
	n, err := c.src.Read(c.in[len(c.in):cap(c.in)])
	c.in = c.in[:len(c.in)+n]
	switch {
	case n > 0:
		return moved, nil
	case err == nil:
		return moved, io.ErrNoProgress
	case err == io.EOF:
		return moved, io.ErrUnexpectedEOF
	}
	return moved, err
}

// replyErr returns the error reply in rbuf, or nil.
func (c *readConn) replyErr() error {
	if len(c.rbuf) > 0 && (c.rbuf[0] == '-' || c.rbuf[0] == '!') {
		r := resp{s: string(c.rbuf)}
		typ, n, rest, err := r.header()
		if err != nil {
			return err
		}
		return r.errorReply(typ, n, rest)
	}
	return nil
}

// maxBulkLen is the longest string Redis sends (its proto-max-bulk-len
// default).
const maxBulkLen = 512 << 20

// replyTimeout is how long a reply may take beyond a read's BLOCK time
// (go-redis allows the same for its blocking commands).
const replyTimeout = 10 * time.Second

// exchange writes the acks of acked, then XREADGROUP of streams (ids are
// the streams, then an id per stream), and reads the replies. Once the
// acks' replies are read, and none is an error, ackWritten is called; then
// the read's reply is parsed. Whether the acks were written is reported by
// whether ackWritten was called. On an I/O or framing error, or an error
// reply to the read other than NOGROUP, the connection is closed.
//
// Cancelling ctx ends the wait for the replies at once (Close must not
// wait out BLOCK plus replyTimeout for a Redis that stopped answering);
// the connection is then closed, since a reply may be half read.
func (c *readConn) exchange(ctx context.Context, acked []*delivery, group, consumer string, ids []string, count int, block time.Duration, ackWritten func()) ([]streamEntries, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c.wbuf = c.wbuf[:0]
	cmds := c.appendAcks(acked, group)
	c.array(9 + len(ids))
	for _, a := range [...]string{"XREADGROUP", "GROUP", group, consumer, "COUNT"} {
		c.bulk(a)
	}
	c.bulkInt(int64(count))
	c.bulk("BLOCK")
	c.bulkInt(block.Milliseconds())
	c.bulk("STREAMS")
	for _, id := range ids {
		c.bulk(id)
	}
	now := time.Now()
	wt := c.opt.WriteTimeout
	if wt <= 0 {
		wt = replyTimeout
	}
	if err := c.send(now.Add(wt), now.Add(block+replyTimeout)); err != nil {
		c.close()
		return nil, err
	}
	// Registered after send, which sets the deadlines: a ctx cancelled
	// before runs the func at once, and its deadline stands.
	nc := c.nc
	stop := context.AfterFunc(ctx, func() { _ = nc.SetReadDeadline(time.Now()) })
	defer func() {
		if !stop() {
			// The deadline was cut short, perhaps after the replies
			// were read: don't reuse the connection with it.
			c.close()
		}
	}()
	// An error reply to an ack (a missing permission, a key of the wrong
	// type) leaves the acks unconfirmed, for the ack loop to retry and
	// report; the connection is fine and the read's reply follows.
	acksOK := true
	for range cmds {
		if err := c.readReply(); err != nil {
			c.close()
			return nil, err
		}
		if err := c.replyErr(); err != nil && !isNoGroup(err) {
			acksOK = false
		}
	}
	if len(acked) > 0 && acksOK {
		ackWritten()
	}
	if err := c.readReply(); err != nil {
		c.close()
		return nil, err
	}
	res, err := parseXRead(c.rbuf)
	c.trim()
	if err != nil && !isNoGroup(err) {
		c.close()
	}
	return res, err
}

// appendAcks appends the XACKs of acked (and the XDELs of those of their
// subscription's retry stream, which belongs to this group alone) and
// returns how many commands it appended.
func (c *readConn) appendAcks(acked []*delivery, group string) int {
	cmds := 0
	for i, d := range acked {
		if i > 0 && acked[i-1].stream == d.stream {
			continue // written with the first of its run
		}
		// The acks of one stream, usually all of them, in one command.
		n := 0
		for _, e := range acked[i:] {
			if e.stream != d.stream {
				break
			}
			n++
		}
		run := acked[i : i+n]
		c.array(3 + n)
		c.bulk("XACK")
		c.bulk(d.stream)
		c.bulk(group)
		c.ids(run)
		cmds++
		// Only entries of a subscription's own retry stream are deleted
		// (delivery.ofRetry), never by the stream's name: a topic named
		// like one is read by other groups too.
		del := 0
		for _, e := range run {
			if e.ofRetry {
				del++
			}
		}
		if del > 0 {
			c.array(2 + del)
			c.bulk("XDEL")
			c.bulk(d.stream)
			for _, e := range run {
				if e.ofRetry {
					c.bulk(e.id)
				}
			}
			cmds++
		}
	}
	return cmds
}

// ids appends the entry ids of ds as bulk strings.
func (c *readConn) ids(ds []*delivery) {
	for _, d := range ds {
		c.bulk(d.id)
	}
}

// appendPublish appends the command of a publish: XADD, or for a publish
// made with WithOnce the EVAL of publishOnceScript, as the go-redis path
// sends them. It reports false, having appended part of it, if a field is
// neither a string nor bytes.
func (c *readConn) appendPublish(r *pubReq) bool {
	if r.onceKey != "" {
		c.array(7 + len(r.fields))
		c.bulk("EVAL")
		c.bulk(publishOnceSource)
		c.bulk("2")
		c.bulk(r.onceKey)
		c.bulk(r.stream)
		c.bulkInt(r.onceTTL.Milliseconds())
		c.bulk(r.onceNonce)
	} else {
		c.array(3 + len(r.fields))
		c.bulk("XADD")
		c.bulk(r.stream)
		c.bulk("*")
	}
	for _, f := range r.fields {
		switch v := f.(type) {
		case string:
			c.wbuf = appendBulk(c.wbuf, v)
		case []byte:
			c.wbuf = appendBulk(c.wbuf, v)
		default:
			return false
		}
	}
	return true
}

// publishReply decodes the reply in rbuf to a command of appendPublish:
// the new entry's id, or for a publish made once nothing, or
// ErrAlreadyPublished when the marker was there.
func (c *readConn) publishReply(once bool) (string, error) {
	if err := c.replyErr(); err != nil {
		return "", err
	}
	r := resp{s: string(c.rbuf)}
	if !once {
		return r.bulk()
	}
	typ, _, rest, err := r.header()
	switch {
	case err != nil:
		return "", err
	case typ != ':':
		return "", fmt.Errorf("%w: want an integer, got %q", errBadReply, typ)
	case rest == "0":
		return "", ErrAlreadyPublished
	case rest == "1":
		return "", nil
	}
	return "", fmt.Errorf("%w: integer %q", errBadReply, rest)
}
