package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
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
	// dlqTruncatedFrom, set on the letter of an entry too large to keep
	// whole (MaxPayloadBytes), is the size in bytes of its payload (of
	// the whole entry, for one that could not be decoded either), of
	// which the letter keeps only the start.
	dlqTruncatedFrom = "dlq_truncated_from"
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
	Raw map[string]string `json:"raw,omitempty"`
	// TruncatedFrom, when not zero, is the size in bytes of the payload
	// (or, with Raw, of the entry) that was too large to keep whole
	// (MaxPayloadBytes): Payload (or each of Raw) holds only its first
	// 64 KiB. Replay refuses such a letter.
	TruncatedFrom int64     `json:"truncated_from,omitempty"`
	Error         string    `json:"error"`
	Attempts      int       `json:"attempts"`
	FirstFailedAt time.Time `json:"first_failed_at,omitzero"`
	LastFailedAt  time.Time `json:"last_failed_at"`
	Consumer      string    `json:"consumer"`
}

// DeadLetters gives operators the dead-letter streams: list, inspect,
// replay and purge.
type DeadLetters struct {
	rdb redis.UniversalClient
	// topology, if set, is the streams each consumer group reads: Replay
	// keeps the letters of a stream their group does not read.
	topology map[string][]string
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

// replayedTTL is how long the marker of a replayed dead letter lives: far
// longer than any replay (or a rerun after one was interrupted) takes. A
// replayed letter that fails again is dead-lettered under a new id, so the
// marker never keeps it from being replayed again.
const replayedTTL = 7 * 24 * time.Hour

// replayedMarker is the key marking that the dead letter id of group was
// added back to the retry stream of stream. It shares the retry stream's
// hash tag: one script updates both, in Redis Cluster too.
func replayedMarker(stream, group, id string) string {
	return "conveyor:{" + stream + "}:" + group + ":replayed:" + id
}

// replayScript adds a replayed dead letter to its group's retry stream once:
// only if the letter's marker was not set yet. The dead-letter stream is in
// another hash slot, so the letter is deleted afterwards, by the caller: a
// second replay of the same letter (run concurrently, or rerun after one
// stopped between the two steps) finds the marker, adds nothing and only
// deletes the letter. It recreates the group on the retry stream if it was
// lost (BUSYGROUP, the usual reply, is ignored), and takes the marker back
// if the add fails, so that the letter, kept, is added by the next replay.
//
// KEYS: marker, retry stream. ARGV: marker TTL in seconds, group, then the
// entry's fields and values. It returns 1 if it added the entry, 0 if the
// marker was already set.
var replayScript = redis.NewScript(`
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
	return 0
end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
local added = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 3))
if type(added) == 'table' and added.err then
	redis.call('DEL', KEYS[1])
	return added
end
return 1
`)

// ErrNotInTopology is returned by Replay, on a DeadLetters given a
// topology (WithTopology), for dead letters whose group does not read their
// stream: a retired group, or a mistyped one. Replayed, they would go to a
// retry stream that no role reads, and vanish from the dead letters.
var ErrNotInTopology = errors.New("not replayed")

// WithTopology returns a DeadLetters like d whose Replay keeps in place,
// instead of replaying, each dead letter whose group does not read its
// stream in topology (consumer group to the streams it reads), and reports
// them with ErrNotInTopology.
func (d *DeadLetters) WithTopology(topology map[string][]string) *DeadLetters {
	c := *d
	c.topology = topology
	return &c
}

// reads reports whether group reads stream in d's topology (always, without
// one).
func (d *DeadLetters) reads(group, stream string) bool {
	if d.topology == nil {
		return true
	}
	return slices.Contains(d.topology[group], stream)
}

// Replay puts dead letters back to work for their group only: each is added
// to the group's retry stream with a fresh attempt count, then removed from
// the dead-letter stream. ids empty means all. It returns how many it
// replayed: the letters it removed, so that concurrent replays of the same
// letters add and count each once, between them.
//
// Each of ids is tried: those not found are reported together, with
// ErrDeadLetterNotFound, after the others were replayed. So are letters
// that keep only the start of a payload too large to keep whole, with
// ErrTruncated, and letters of a stream that group does not read, with
// ErrNotInTopology, if d was given a topology; both are kept.
func (d *DeadLetters) Replay(ctx context.Context, group string, ids ...string) (int, error) {
	refused := map[string]int{} // by stream
	var truncated []string
	n, err := d.each(ctx, group, ids, func(x redis.XMessage) (bool, error) {
		if str(x.Values[dlqTruncatedFrom]) != "" {
			truncated = append(truncated, x.ID)
			return false, nil
		}
		fields, stream, err := replayFields(x)
		if err != nil {
			return false, err
		}
		if !d.reads(group, stream) {
			refused[stream]++
			return false, nil
		}
		marker := replayedMarker(stream, group, x.ID)
		args := append([]any{int64(replayedTTL / time.Second), group}, fields...)
		if err := replayScript.Run(ctx, d.rdb, []string{marker, RetryStream(stream, group)}, args...).Err(); err != nil {
			return false, fmt.Errorf("replay %s: %w", x.ID, err)
		}
		// Added now or by an earlier replay: either way it is back at
		// work, and the letter goes. Whoever removes it counts it.
		removed, err := d.rdb.XDel(ctx, DeadLetterStream(group), x.ID).Result()
		if err != nil {
			return false, fmt.Errorf("remove replayed %s: %w", x.ID, err)
		}
		return removed == 1, nil
	})
	return n, errors.Join(err, truncatedRefusal(group, truncated), d.refusal(group, refused))
}

// ErrTruncated is returned by Replay for dead letters that keep only the
// start of a payload too large to keep whole (MaxPayloadBytes). Replayed,
// the rest of the payload missing, they could only fail to decode and be
// dead-lettered again.
var ErrTruncated = errors.New("not replayed")

// truncatedRefusal describes the dead letters that Replay kept because
// they are truncated (at most ten by id), or is nil if there were none.
func truncatedRefusal(group string, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	named := strings.Join(ids[:min(len(ids), 10)], ", ")
	if len(ids) > 10 {
		named += fmt.Sprintf(" and %d more", len(ids)-10)
	}
	return fmt.Errorf("%w: %d dead letter(s) of %s keep only the first %d bytes of a payload too large to keep whole, "+
		"and would only be dead-lettered again (%s); they are kept", ErrTruncated, len(ids), group, truncatedPayloadBytes, named)
}

// refusal describes the dead letters that Replay kept because group does
// not read their stream, or is nil if there were none.
func (d *DeadLetters) refusal(group string, refused map[string]int) error {
	if len(refused) == 0 {
		return nil
	}
	known := strings.Join(slices.Sorted(maps.Keys(d.topology)), ", ")
	if streams, ok := d.topology[group]; ok {
		known = "it reads " + strings.Join(streams, ", ") + "; known groups: " + known
	} else {
		known = "known groups: " + known
	}
	var errs []error
	for _, stream := range slices.Sorted(maps.Keys(refused)) {
		errs = append(errs, fmt.Errorf("%w: group %s does not read stream %s in any role (%s); %d dead letter(s) kept",
			ErrNotInTopology, group, stream, known, refused[stream]))
	}
	return errors.Join(errs...)
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

// each calls fn for the listed dead letters, or for all of them, in pages,
// and returns how many calls reported done. Each of ids is tried; those not
// found are reported together after the others, with ErrDeadLetterNotFound.
// All is every one there when it starts: a replayed letter that fails
// again comes back with a newer id, and must not be replayed again in the
// same run. An error of fn stops it.
func (d *DeadLetters) each(ctx context.Context, group string, ids []string, fn func(redis.XMessage) (bool, error)) (int, error) {
	done := 0
	call := func(x redis.XMessage) error {
		ok, err := fn(x)
		if ok {
			done++
		}
		return err
	}
	if err := checkIDs(ids); err != nil {
		return 0, err
	}
	if len(ids) > 0 {
		var missing []string
		for _, id := range ids {
			xs, err := d.rdb.XRange(ctx, DeadLetterStream(group), id, id).Result()
			if err != nil {
				return done, fmt.Errorf("read dead letter %s: %w", id, err)
			}
			if len(xs) == 0 {
				missing = append(missing, id)
				continue
			}
			if err := call(xs[0]); err != nil {
				return done, err
			}
		}
		if len(missing) > 0 {
			return done, fmt.Errorf("%w: %s in group %s", ErrDeadLetterNotFound, strings.Join(missing, ", "), group)
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
			if err := call(x); err != nil {
				return done, err
			}
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
	dl.TruncatedFrom, _ = strconv.ParseInt(str(v[dlqTruncatedFrom]), 10, 64)
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

// Exists reports whether group has a dead-letter stream, even an empty one.
func (d *DeadLetters) Exists(ctx context.Context, group string) (bool, error) {
	n, err := d.rdb.Exists(ctx, DeadLetterStream(group)).Result()
	if err != nil {
		return false, fmt.Errorf("look for the dead-letter stream of %s: %w", group, err)
	}
	return n == 1, nil
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
