package bus

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/conveyor/conveyor/events"
)

// PublishAt stores ev durably in its stream's delay set (the same sorted-set
// mechanism as retries) to be appended to the stream at at, by whichever
// process runs MoveDue first. A time not in the future publishes at once.
// It returns the event id.
func (p *Publisher) PublishAt(ctx context.Context, at time.Time, ev events.Event, opts ...PublishOption) (string, error) {
	if !at.After(time.Now()) {
		return p.PublishEvent(ctx, ev, opts...)
	}
	if err := ev.Validate(); err != nil {
		return "", fmt.Errorf("publish %s: %w", ev.EventType(), err)
	}
	id, fields, err := p.eventFields(ctx, ev, opts)
	if err != nil {
		return "", err
	}
	member, err := msgpack.Marshal(stringFields(fields))
	if err != nil {
		return "", fmt.Errorf("marshal delayed %s: %w", ev.EventType(), err)
	}
	stream := p.Stream(ev.EventType())
	if ttl := onceOf(opts); ttl > 0 {
		n, err := delayOnceScript.Run(ctx, p.cfg.Client, []string{OnceKey(stream, id), DelayedSet(stream)},
			ttl.Milliseconds(), p.onceNonce(), at.UnixMilli(), member).Int()
		if err != nil {
			return "", fmt.Errorf("delay %s until %s: %w", ev.EventType(), at.Format(time.RFC3339), err)
		}
		if n == 0 {
			return id, ErrAlreadyPublished
		}
		return id, nil
	}
	if err := p.cfg.Client.ZAdd(ctx, DelayedSet(stream), redis.Z{Score: float64(at.UnixMilli()), Member: member}).Err(); err != nil {
		return "", fmt.Errorf("delay %s until %s: %w", ev.EventType(), at.Format(time.RFC3339), err)
	}
	return id, nil
}

// CancelDelayed removes the delayed event id, held until at (as given to
// PublishAt), if it was not moved yet; it reports whether it found it. The
// api uses it to undo a delay whose follow-up publish failed. It reads only
// the members held until at, not the whole set, which may hold every
// scheduled email.
func (p *Publisher) CancelDelayed(ctx context.Context, eventType, id string, at time.Time) (bool, error) {
	set := DelayedSet(p.Stream(eventType))
	ms := strconv.FormatInt(at.UnixMilli(), 10)
	members, err := p.cfg.Client.ZRangeByScore(ctx, set, &redis.ZRangeBy{Min: ms, Max: ms}).Result()
	if err != nil {
		return false, err
	}
	for _, m := range members {
		var f []string
		if msgpack.Unmarshal([]byte(m), &f) == nil && len(f) > 1 && f[0] == fieldUUID && f[1] == id {
			n, err := p.cfg.Client.ZRem(ctx, set, m).Result()
			return n > 0, err
		}
	}
	return false, nil
}

func stringFields(fields []any) []string {
	out := make([]string, len(fields))
	for i, f := range fields {
		switch v := f.(type) {
		case string:
			out[i] = v
		case []byte:
			out[i] = string(v)
		default:
			out[i] = fmt.Sprint(v)
		}
	}
	return out
}

// delayOnceScript holds an event back unless its once-marker exists,
// setting the marker in the same step. KEYS[1] = marker, KEYS[2] = delay
// set; ARGV[1] = marker TTL (ms), ARGV[2] = the call's nonce (see
// onceNonce), ARGV[3] = due (ms), ARGV[4] = member.
// A script is not rolled back when a command in it fails, so a failed ZADD
// (the key holds another type) removes the marker again before it fails:
// a marker always means the event is held. The marker holds the nonce, so
// that the same call run again (its reply was lost and the client sent it
// again) succeeds as its first run did, adding nothing: only a marker of
// another call means the event was published before.
var delayOnceScript = redis.NewScript(`
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  local r = redis.pcall('ZADD', KEYS[2], ARGV[3], ARGV[4])
  if type(r) == 'table' and r.err then
    redis.call('DEL', KEYS[1])
    return r
  end
  return 1
end
if redis.pcall('GET', KEYS[1]) == ARGV[2] then return 1 end
return 0`)

// MoveDue appends at most limit due delayed events of stream to it,
// atomically, so that with many processes each event is appended exactly
// once; a member that is not an event is set aside (see Moved).
func MoveDue(ctx context.Context, rdb redis.Scripter, stream string, limit int) (Moved, error) {
	return moveDueTo(ctx, rdb, DelayedSet(stream), stream, limit)
}

// publishOnceScript appends an entry unless its marker exists, setting the
// marker in the same step. KEYS[1] = marker, KEYS[2] = stream; ARGV[1] =
// marker TTL (ms), ARGV[2] = the call's nonce (see onceNonce), ARGV[3..] =
// fields.
// As in delayOnceScript, a failed append removes the marker again, so a
// marker always means the entry is in the stream, and a marker holding
// this call's nonce means that this call appended it in an earlier run.
var publishOnceScript = redis.NewScript(publishOnceSource)

const publishOnceSource = `
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  local r = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 3))
  if type(r) == 'table' and r.err then
    redis.call('DEL', KEYS[1])
    return r
  end
  return 1
end
if redis.pcall('GET', KEYS[1]) == ARGV[2] then return 1 end
return 0`

// OnceKey is the marker key of PublishOnce for stream and key. It carries
// the stream's hash tag, so the marker and the stream share a slot.
func OnceKey(stream, key string) string { return "conveyor:{" + stream + "}:once:" + key }

// PublishOnce appends ev to its stream unless an earlier PublishOnce with
// the same key did, within ttl. The check and the append are one atomic
// step, so any number of processes may race for the same key and exactly
// one publishes; a process that dies mid-call either published or left the
// key free. It reports whether this call published.
func (p *Publisher) PublishOnce(ctx context.Context, key string, ttl time.Duration, ev events.Event, opts ...PublishOption) (bool, string, error) {
	if err := ev.Validate(); err != nil {
		return false, "", fmt.Errorf("publish %s: %w", ev.EventType(), err)
	}
	id, fields, err := p.eventFields(ctx, ev, opts)
	if err != nil {
		return false, "", err
	}
	stream := p.Stream(ev.EventType())
	args := append([]any{ttl.Milliseconds(), p.onceNonce()}, fields...)
	n, err := publishOnceScript.Run(ctx, p.cfg.Client, []string{OnceKey(stream, key), stream}, args...).Int()
	if err != nil {
		return false, "", fmt.Errorf("publish %s once as %s: %w", ev.EventType(), key, err)
	}
	return n == 1, id, nil
}
