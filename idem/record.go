package idem

import (
	"encoding/json"
	"time"
)

// Record is what an Idempotency-Key maps to.
type Record struct {
	// Fingerprint identifies the request (for example a hash of its
	// body), so a reused key with a different request can be refused.
	Fingerprint string `json:"fp,omitempty"`
	// BodyFingerprint identifies a request whose fingerprint is known only
	// once its body is read (an upload, streamed into storage): it is
	// recorded when the body has been, and checked against a later
	// request's body. (A field of its own: replicas that predate it read
	// Fingerprint only, and keep replaying.)
	BodyFingerprint string `json:"bfp,omitempty"`
	// Owner is the random token of the request that claimed the key; only
	// it may prepare, complete or release the record (see Claim).
	Owner string `json:"own,omitempty"`
	// Done is false while the first request is still running.
	Done bool `json:"done"`
	// Status and Body are the stored response.
	Status int             `json:"status,omitempty"`
	Body   json.RawMessage `json:"body,omitempty"`
	// RetainUntil, if set, keeps the record until then plus the Store's
	// TTL, instead of for the TTL from its last write: the record of work
	// held back until a time must answer retries for as long after that
	// time as other records do after their work.
	RetainUntil *time.Time `json:"retain_until,omitempty"`
	// Pending, on a record that is not Done, is the event the first
	// request was about to publish when it recorded it. Whether that
	// publish happened may be unknown (a connection lost mid-write), so a
	// retry publishes the same event again, idempotently, and answers
	// with Status and Body.
	Pending *Pending `json:"pending,omitempty"`
}

// Pending is an event prepared for publishing, with what the request
// records for reads once it is published.
type Pending struct {
	EventType string          `json:"type"`
	EventID   string          `json:"id"`
	Payload   json.RawMessage `json:"payload"`
	// DeliverAt, if set, holds the event back until then instead of
	// appending it at once.
	DeliverAt *time.Time `json:"deliver_at,omitempty"`
	// Then is an event to publish once this one is (a notice that it is
	// held back, say).
	Then *Pending `json:"then,omitempty"`
	// ViewKey and View are the record that answers reads until the
	// event is projected.
	ViewKey string          `json:"view_key,omitempty"`
	View    json.RawMessage `json:"view,omitempty"`
}

func (r Record) encode() string {
	b, _ := json.Marshal(r)
	return string(b)
}

func decodeRecord(s string) (Record, error) {
	var r Record
	err := json.Unmarshal([]byte(s), &r)
	return r, err
}
