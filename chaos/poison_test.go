package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// Stream entry fields of the wire format (watermill-redisstream's
// marshaller; see bus/wire.go).
const (
	fieldUUID     = "_watermill_message_uuid"
	fieldMetadata = "metadata"
	fieldPayload  = "payload"
	// poisonField marks entries that have no usable id field; dead letters
	// of undecodable entries keep every field, so the mark comes back.
	poisonField = "chaos_poison"
)

// poisonKind is one way to write an entry no consumer can handle. Each is
// a permanent error: every group that reads the stream must dead-letter
// it exactly once, and go on with the entries behind it.
type poisonKind struct {
	name string
	// decodable says whether the entry decodes as a message (its dead
	// letter then names its id), as opposed to being stored raw.
	decodable bool
	fields    func(marker, stream string) map[string]any
}

var poisonKinds = []poisonKind{
	{"no id field", false, func(m, _ string) map[string]any {
		return map[string]any{"garbage": "yes", poisonField: m}
	}},
	{"empty id", false, func(m, _ string) map[string]any {
		return map[string]any{fieldUUID: "", fieldPayload: "{}", poisonField: m}
	}},
	{"metadata not msgpack", false, func(m, _ string) map[string]any {
		return map[string]any{fieldUUID: m, fieldMetadata: "\xc1\xc1\xc1", fieldPayload: "{}"}
	}},
	{"metadata not a map", false, func(m, _ string) map[string]any {
		b, _ := msgpack.Marshal("a string, not a map")
		return map[string]any{fieldUUID: m, fieldMetadata: b, fieldPayload: "{}"}
	}},
	{"payload not JSON", true, func(m, s string) map[string]any {
		return map[string]any{fieldUUID: m, fieldMetadata: envelope(m, s, "1"), fieldPayload: "{not json"}
	}},
	{"payload fails validation", true, func(m, s string) map[string]any {
		return map[string]any{fieldUUID: m, fieldMetadata: envelope(m, s, "1"), fieldPayload: `{"doc_id":"not-a-uuid","email_id":"nope"}`}
	}},
	{"type of another stream", true, func(m, s string) map[string]any {
		return map[string]any{fieldUUID: m, fieldMetadata: envelope(m, otherType(s), "1"), fieldPayload: "{}"}
	}},
	{"unknown version", true, func(m, s string) map[string]any {
		return map[string]any{fieldUUID: m, fieldMetadata: envelope(m, s, "99"), fieldPayload: "{}"}
	}},
}

// envelope returns msgpack metadata of a well-formed envelope.
func envelope(id, eventType, version string) []byte {
	b, _ := msgpack.Marshal(map[string]string{
		bus.MetaEventID:      id,
		bus.MetaEventType:    eventType,
		bus.MetaEventVersion: version,
		bus.MetaOccurredAt:   time.Now().UTC().Format(time.RFC3339Nano),
		bus.MetaSource:       "chaos",
	})
	return b
}

// otherType returns an event type that is not t.
func otherType(t string) string {
	if t == events.TypeEmailRequested {
		return events.TypeDocumentUploaded
	}
	return events.TypeEmailRequested
}

// poisonEntry is one poison entry written, and the groups that must
// dead-letter it.
type poisonEntry struct {
	marker, stream, kind string
	groups               []string
}

// poisonBook records every poison entry written.
type poisonBook struct {
	seed    uint64
	mu      sync.Mutex
	entries []poisonEntry
}

// inject writes n poison entries of random kinds into random streams, and
// returns how many it wrote. The groups that must dead-letter an entry are
// the groups of the topology that exist on its stream when it is written.
func (b *poisonBook) inject(ctx context.Context, rdb *redis.Client, r *rand.Rand, n int) (int, error) {
	streams := events.Types()
	groupsOf := topology()
	for range n {
		pk := poisonKinds[r.IntN(len(poisonKinds))]
		stream := streams[r.IntN(len(streams))]
		b.mu.Lock()
		marker := fmt.Sprintf("poison-%d-%d", b.seed, len(b.entries)+1)
		b.mu.Unlock()
		infos, err := rdb.XInfoGroups(ctx, stream).Result()
		if err != nil {
			return 0, fmt.Errorf("groups of %s: %w", stream, err)
		}
		var groups []string
		for _, gi := range infos {
			for g, ss := range groupsOf {
				for _, s := range ss {
					if g == gi.Name && s == stream {
						groups = append(groups, g)
					}
				}
			}
		}
		if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: pk.fields(marker, stream)}).Err(); err != nil {
			return 0, fmt.Errorf("xadd poison to %s: %w", stream, err)
		}
		b.mu.Lock()
		b.entries = append(b.entries, poisonEntry{marker: marker, stream: stream, kind: pk.name, groups: groups})
		b.mu.Unlock()
	}
	return n, nil
}

// want returns how many dead letters each group must hold, and the
// markers each must hold once.
func (b *poisonBook) want() (map[string]int, map[string]map[string]bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := map[string]int{}
	markers := map[string]map[string]bool{}
	for _, e := range b.entries {
		for _, g := range e.groups {
			n[g]++
			if markers[g] == nil {
				markers[g] = map[string]bool{}
			}
			markers[g][e.marker] = true
		}
	}
	return n, markers
}

// count returns how many poison entries were written.
func (b *poisonBook) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.entries)
}

// poisonMarker returns the marker of the poison entry a dead letter came
// from, or "" if it did not come from one.
func poisonMarker(d bus.DeadLetter) string {
	for _, v := range []string{d.EventID, d.Raw[poisonField], d.Raw[fieldUUID]} {
		if strings.HasPrefix(v, "poison-") {
			return v
		}
	}
	return ""
}
