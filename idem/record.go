package idem

import "encoding/json"

// Record is what an Idempotency-Key maps to.
type Record struct {
	// Fingerprint identifies the request (for example a hash of its
	// body), so a reused key with a different request can be refused.
	Fingerprint string `json:"fp,omitempty"`
	// Done is false while the first request is still running.
	Done bool `json:"done"`
	// Status and Body are the stored response.
	Status int             `json:"status,omitempty"`
	Body   json.RawMessage `json:"body,omitempty"`
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
