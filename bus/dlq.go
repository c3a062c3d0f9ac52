package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"
)

// Fields of a dead-letter entry besides the original entry's fields.
const (
	dlqStream        = "dlq_stream"
	dlqEntryID       = "dlq_entry_id"
	dlqGroup         = "dlq_group"
	dlqConsumer      = "dlq_consumer"
	dlqError         = "dlq_error"
	dlqAttempts      = "dlq_attempts"
	dlqFirstFailedAt = "dlq_first_failed_at"
	dlqLastFailedAt  = "dlq_last_failed_at"
	// dlqRaw holds every field of an entry that could not be decoded,
	// exactly as it was, as a msgpack map of strings.
	dlqRaw = "dlq_raw"
)

// DeadLetter is one entry of a group's dead-letter stream.
type DeadLetter struct {
	// ID is the entry id in the dead-letter stream.
	ID string `json:"id"`
	// Group is the consumer group that gave up.
	Group string `json:"group"`
	// Stream and EntryID locate the original entry.
	Stream  string `json:"stream"`
	EntryID string `json:"entry_id"`
	// EventID and EventType come from the original message, if it decoded.
	EventID   string            `json:"event_id,omitempty"`
	EventType string            `json:"event_type,omitempty"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	Payload   string            `json:"payload,omitempty"`
	// Raw holds the fields of an entry that could not be decoded.
	Raw           map[string]string `json:"raw,omitempty"`
	Error         string            `json:"error"`
	Attempts      int               `json:"attempts"`
	FirstFailedAt time.Time         `json:"first_failed_at,omitzero"`
	LastFailedAt  time.Time         `json:"last_failed_at"`
	Consumer      string            `json:"consumer"`
}

// DeadLetters gives operators the dead-letter streams: list, inspect,
// replay and purge.
type DeadLetters struct {
	rdb redis.UniversalClient
}

// NewDeadLetters returns a DeadLetters on rdb (which it never closes).
func NewDeadLetters(rdb redis.UniversalClient) *DeadLetters { return &DeadLetters{rdb: rdb} }

// ErrDeadLetterNotFound is returned for an unknown dead-letter id.
var ErrDeadLetterNotFound = errors.New("dead letter not found")

// ErrBadDeadLetterID is returned for an id that is not a whole stream
// entry id (milliseconds-sequence): Redis would take "1700000000000" for
// the first entry of that millisecond, whichever it is.
var ErrBadDeadLetterID = errors.New("not a dead-letter id (want milliseconds-sequence, as dlq list prints it)")

// checkIDs returns ErrBadDeadLetterID for the first id that is not a whole
// entry id.
func checkIDs(ids []string) error {
	for _, id := range ids {
		ms, seq, ok := strings.Cut(id, "-")
		_, msErr := strconv.ParseUint(ms, 10, 64)
		_, seqErr := strconv.ParseUint(seq, 10, 64)
		if !ok || msErr != nil || seqErr != nil {
			return fmt.Errorf("%w: %q", ErrBadDeadLetterID, id)
		}
	}
	return nil
}

// last returns the id of the newest dead letter of group, or "" if there
// is none.
func (d *DeadLetters) last(ctx context.Context, group string) (string, error) {
	xs, err := d.rdb.XRevRangeN(ctx, DeadLetterStream(group), "+", "-", 1).Result()
	if err != nil {
		return "", fmt.Errorf("read the newest dead letter of %s: %w", group, err)
	}
	if len(xs) == 0 {
		return "", nil
	}
	return xs[0].ID, nil
}

// Count returns the number of dead letters of group.
func (d *DeadLetters) Count(ctx context.Context, group string) (int64, error) {
	n, err := d.rdb.XLen(ctx, DeadLetterStream(group)).Result()
	if err != nil {
		return 0, fmt.Errorf("count dead letters of %s: %w", group, err)
	}
	return n, nil
}

// List returns up to limit dead letters of group, oldest first, starting
// after the id after ("" for the start).
func (d *DeadLetters) List(ctx context.Context, group, after string, limit int64) ([]DeadLetter, error) {
	if limit < 1 {
		return nil, fmt.Errorf("list dead letters of %s: the limit must be at least 1", group)
	}
	start := "-"
	if after != "" {
		if err := checkIDs([]string{after}); err != nil {
			return nil, err
		}
		start = "(" + after
	}
	xs, err := d.rdb.XRangeN(ctx, DeadLetterStream(group), start, "+", limit).Result()
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", group, err)
	}
	out := make([]DeadLetter, 0, len(xs))
	for _, x := range xs {
		out = append(out, parseDeadLetter(group, x))
	}
	return out, nil
}

// Get returns one dead letter.
func (d *DeadLetters) Get(ctx context.Context, group, id string) (DeadLetter, error) {
	if err := checkIDs([]string{id}); err != nil {
		return DeadLetter{}, err
	}
	xs, err := d.rdb.XRange(ctx, DeadLetterStream(group), id, id).Result()
	if err != nil {
		return DeadLetter{}, fmt.Errorf("get dead letter %s of %s: %w", id, group, err)
	}
	if len(xs) == 0 {
		return DeadLetter{}, fmt.Errorf("%w: %s in group %s", ErrDeadLetterNotFound, id, group)
	}
	return parseDeadLetter(group, xs[0]), nil
}

// Replay puts dead letters back to work for their group only: each is added
// to the group's retry stream with a fresh attempt count, then removed from
// the dead-letter stream. ids empty means all. It returns how many it
// replayed.
func (d *DeadLetters) Replay(ctx context.Context, group string, ids ...string) (int, error) {
	return d.each(ctx, group, ids, func(x redis.XMessage) error {
		fields, stream, err := replayFields(x)
		if err != nil {
			return err
		}
		pipe := d.rdb.Pipeline()
		pipe.XGroupCreateMkStream(ctx, RetryStream(stream, group), group, "0")
		add := pipe.XAdd(ctx, &redis.XAddArgs{Stream: RetryStream(stream, group), Values: fields})
		if _, err := pipe.Exec(ctx); err != nil && add.Err() != nil {
			return fmt.Errorf("replay %s: %w", x.ID, add.Err())
		}
		if err := d.rdb.XDel(ctx, DeadLetterStream(group), x.ID).Err(); err != nil {
			return fmt.Errorf("remove replayed %s: %w", x.ID, err)
		}
		return nil
	})
}

// Purge deletes dead letters; ids empty means all, that is every one there
// when it starts: one dead-lettered meanwhile stays, to be seen first. It
// returns how many it deleted, and ErrDeadLetterNotFound if some of ids
// were not there (the others are deleted).
func (d *DeadLetters) Purge(ctx context.Context, group string, ids ...string) (int, error) {
	if len(ids) == 0 {
		end, err := d.last(ctx, group)
		if err != nil || end == "" {
			return 0, err
		}
		n, err := d.rdb.XTrimMinID(ctx, DeadLetterStream(group), nextID(end)).Result()
		if err != nil {
			return 0, fmt.Errorf("purge dead letters of %s: %w", group, err)
		}
		return int(n), nil
	}
	if err := checkIDs(ids); err != nil {
		return 0, err
	}
	n, err := d.rdb.XDel(ctx, DeadLetterStream(group), ids...).Result()
	if err != nil {
		return 0, fmt.Errorf("purge dead letters of %s: %w", group, err)
	}
	if int(n) < len(ids) {
		return int(n), fmt.Errorf("%w: %d of the %d ids in group %s", ErrDeadLetterNotFound, len(ids)-int(n), len(ids), group)
	}
	return int(n), nil
}

// each calls fn for the listed dead letters, or for all of them, in pages.
// All is every one there when it starts: a replayed letter that fails
// again comes back with a newer id, and must not be replayed again in the
// same run.
func (d *DeadLetters) each(ctx context.Context, group string, ids []string, fn func(redis.XMessage) error) (int, error) {
	done := 0
	if err := checkIDs(ids); err != nil {
		return 0, err
	}
	if len(ids) > 0 {
		for _, id := range ids {
			xs, err := d.rdb.XRange(ctx, DeadLetterStream(group), id, id).Result()
			if err != nil {
				return done, fmt.Errorf("read dead letter %s: %w", id, err)
			}
			if len(xs) == 0 {
				return done, fmt.Errorf("%w: %s in group %s", ErrDeadLetterNotFound, id, group)
			}
			if err := fn(xs[0]); err != nil {
				return done, err
			}
			done++
		}
		return done, nil
	}
	end, err := d.last(ctx, group)
	if err != nil || end == "" {
		return 0, err
	}
	start := "-"
	for {
		xs, err := d.rdb.XRangeN(ctx, DeadLetterStream(group), start, end, 500).Result()
		if err != nil {
			return done, fmt.Errorf("read dead letters of %s: %w", group, err)
		}
		if len(xs) == 0 {
			return done, nil
		}
		for _, x := range xs {
			if err := fn(x); err != nil {
				return done, err
			}
			done++
		}
		start = "(" + xs[len(xs)-1].ID
	}
}

func str(v any) string {
	s, _ := v.(string)
	return s
}

func parseDeadLetter(group string, x redis.XMessage) DeadLetter {
	v := x.Values
	dl := DeadLetter{
		ID:       x.ID,
		Group:    group,
		Stream:   str(v[dlqStream]),
		EntryID:  str(v[dlqEntryID]),
		EventID:  str(v[fieldUUID]),
		Payload:  str(v[fieldPayload]),
		Error:    str(v[dlqError]),
		Consumer: str(v[dlqConsumer]),
	}
	dl.Attempts, _ = strconv.Atoi(str(v[dlqAttempts]))
	dl.FirstFailedAt, _ = time.Parse(time.RFC3339Nano, str(v[dlqFirstFailedAt]))
	dl.LastFailedAt, _ = time.Parse(time.RFC3339Nano, str(v[dlqLastFailedAt]))
	if dl.FirstFailedAt.IsZero() {
		dl.FirstFailedAt = dl.LastFailedAt
	}
	if md := str(v[fieldMetadata]); md != "" {
		m := map[string]string{}
		if msgpack.Unmarshal([]byte(md), &m) == nil {
			dl.Metadata = m
			dl.EventType = m[MetaEventType]
		}
	}
	if raw := str(v[dlqRaw]); raw != "" {
		if m, err := decodeRaw(raw); err == nil {
			dl.Raw = m
		}
	}
	return dl
}

// decodeRaw decodes the fields of an undecodable entry: a msgpack map of
// strings, which keeps any bytes (dead letters written before held JSON,
// which replaced bytes that are not UTF-8).
func decodeRaw(raw string) (map[string]string, error) {
	m := map[string]string{}
	if strings.HasPrefix(raw, "{") {
		return m, json.Unmarshal([]byte(raw), &m)
	}
	kv, err := decodeMetadataPairs(raw)
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m, err
}

// replayFields rebuilds the original entry of a dead letter, with the
// attempt count and failure history removed so it gets a full retry budget.
func replayFields(x redis.XMessage) ([]any, string, error) {
	stream := str(x.Values[dlqStream])
	if stream == "" {
		return nil, "", fmt.Errorf("dead letter %s names no stream", x.ID)
	}
	if raw := str(x.Values[dlqRaw]); raw != "" {
		m, err := decodeRaw(raw)
		if err != nil {
			return nil, "", fmt.Errorf("dead letter %s: raw fields: %w", x.ID, err)
		}
		fields := make([]any, 0, 2*len(m))
		for k, v := range m {
			fields = append(fields, k, v)
		}
		if len(fields) == 0 {
			fields = append(fields, "empty", "")
		}
		return fields, stream, nil
	}
	md := map[string]string{}
	if s := str(x.Values[fieldMetadata]); s != "" {
		if err := msgpack.Unmarshal([]byte(s), &md); err != nil {
			return nil, "", fmt.Errorf("dead letter %s: metadata: %w", x.ID, err)
		}
	}
	for _, k := range []string{MetaAttempt, MetaFirstFailedAt, MetaLastError} {
		delete(md, k)
	}
	mdb, err := msgpack.Marshal(md)
	if err != nil {
		return nil, "", err
	}
	return []any{
		fieldUUID, str(x.Values[fieldUUID]),
		fieldMetadata, mdb,
		fieldPayload, str(x.Values[fieldPayload]),
		fieldOrigin, "dlq/" + x.ID,
	}, stream, nil
}

// Groups lists the consumer groups that have a dead-letter stream.
func (d *DeadLetters) Groups(ctx context.Context) ([]string, error) {
	var out []string
	iter := d.rdb.Scan(ctx, 0, DeadLetterStream("*"), 100).Iterator()
	for iter.Next(ctx) {
		out = append(out, strings.TrimPrefix(iter.Val(), DeadLetterStream("")))
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("list dead-letter streams: %w", err)
	}
	return out, nil
}
