package events

import (
	"fmt"
	"net/mail"
	"strings"
	"time"
)

// Limits on payload fields. They protect consumers and Postgres from
// unbounded input that arrives from outside (HTTP or other services).
const (
	MaxFilenameBytes = 255
	MaxSubjectBytes  = 998 // RFC 5322 line limit
	MaxBodyBytes     = 1 << 20
	MaxReasonBytes   = 2000
	MaxSummaryBytes  = 2000
	// MaxLocalPartBytes and MaxAddressBytes are the RFC 5321 limits of an
	// address (without display name): a mail server may refuse a longer
	// one, and nothing should store 20 KB as an address. 254 is the
	// 256-octet path limit less its angle brackets.
	MaxLocalPartBytes = 64
	MaxAddressBytes   = 254
)

// DocumentUploaded says the api stored an upload's bytes and accepted it.
type DocumentUploaded struct {
	DocID    string `json:"doc_id"`
	Filename string `json:"filename"`
	Size     int64  `json:"size"`
	SHA256   string `json:"sha256"`
	// BlobKey addresses the bytes in blob storage.
	BlobKey string `json:"blob_key"`
	// DeclaredContentType is what the client claimed; informational only,
	// the processor sniffs the real type from the bytes.
	DeclaredContentType string `json:"declared_content_type,omitempty"`
	// Notify is an email address to tell when processing ends.
	Notify     string    `json:"notify,omitempty"`
	UploadedAt time.Time `json:"uploaded_at"`
}

// EventType implements Event.
func (*DocumentUploaded) EventType() string { return TypeDocumentUploaded }

// EventVersion implements Event.
func (*DocumentUploaded) EventVersion() int { return 1 }

// Validate implements Event.
func (e *DocumentUploaded) Validate() error {
	var v validator
	v.uuid("doc_id", e.DocID)
	v.maxLen("filename", e.Filename, MaxFilenameBytes)
	v.nonNegative("size", e.Size)
	if v.required("sha256", e.SHA256) && !isHex(e.SHA256, 64) {
		v.add("sha256", "must be 64 lowercase hex characters")
	}
	if v.required("blob_key", e.BlobKey) && !isHex(e.BlobKey, 64) {
		v.add("blob_key", "must be 64 lowercase hex characters")
	}
	if e.Notify != "" {
		if _, err := parseAddress(e.Notify); err != nil {
			v.add("notify", err.Error())
		}
	}
	v.time("uploaded_at", e.UploadedAt)
	v.text("filename", e.Filename)
	v.text("declared_content_type", e.DeclaredContentType)
	v.text("notify", e.Notify)
	return v.err()
}

// DocumentProcessed says a document was processed successfully.
type DocumentProcessed struct {
	DocID       string    `json:"doc_id"`
	ContentType string    `json:"content_type"`
	Words       int       `json:"words"`
	Lines       int       `json:"lines"`
	Summary     string    `json:"summary"`
	ProcessedAt time.Time `json:"processed_at"`
}

// EventType implements Event.
func (*DocumentProcessed) EventType() string { return TypeDocumentProcessed }

// EventVersion implements Event.
func (*DocumentProcessed) EventVersion() int { return 1 }

// Validate implements Event.
func (e *DocumentProcessed) Validate() error {
	var v validator
	v.uuid("doc_id", e.DocID)
	v.required("content_type", e.ContentType)
	v.count("words", int64(e.Words))
	v.count("lines", int64(e.Lines))
	v.maxLen("summary", e.Summary, MaxSummaryBytes)
	v.time("processed_at", e.ProcessedAt)
	v.text("content_type", e.ContentType)
	v.text("summary", e.Summary)
	return v.err()
}

// DocumentProcessingFailed says a document cannot be processed. It is a
// final outcome: unsupported or corrupt input is not retried.
type DocumentProcessingFailed struct {
	DocID       string    `json:"doc_id"`
	ContentType string    `json:"content_type,omitempty"`
	Reason      string    `json:"reason"`
	FailedAt    time.Time `json:"failed_at"`
}

// EventType implements Event.
func (*DocumentProcessingFailed) EventType() string { return TypeDocumentProcessingFailed }

// EventVersion implements Event.
func (*DocumentProcessingFailed) EventVersion() int { return 1 }

// Validate implements Event.
func (e *DocumentProcessingFailed) Validate() error {
	var v validator
	v.uuid("doc_id", e.DocID)
	v.required("reason", e.Reason)
	v.maxLen("reason", e.Reason, MaxReasonBytes)
	v.time("failed_at", e.FailedAt)
	v.text("content_type", e.ContentType)
	v.text("reason", e.Reason)
	return v.err()
}

// EmailRequested asks for an email to be sent.
type EmailRequested struct {
	EmailID string `json:"email_id"`
	To      string `json:"to"`
	Subject string `json:"subject"`
	Body    string `json:"body"`
	// DocID is set when the email notifies about a document.
	DocID       string    `json:"doc_id,omitempty"`
	RequestedAt time.Time `json:"requested_at"`
}

// EventType implements Event.
func (*EmailRequested) EventType() string { return TypeEmailRequested }

// EventVersion implements Event.
func (*EmailRequested) EventVersion() int { return 1 }

// Validate implements Event.
func (e *EmailRequested) Validate() error {
	var v validator
	v.uuid("email_id", e.EmailID)
	if v.required("to", e.To) {
		if _, err := parseAddress(e.To); err != nil {
			v.add("to", err.Error())
		}
	}
	if v.required("subject", e.Subject) {
		v.maxLen("subject", e.Subject, MaxSubjectBytes)
		if strings.ContainsAny(e.Subject, "\r\n") {
			v.add("subject", "must be a single line")
		}
	}
	if v.required("body", e.Body) {
		v.maxLen("body", e.Body, MaxBodyBytes)
	}
	if e.DocID != "" && !IsUUID(e.DocID) {
		v.add("doc_id", "must be a UUID")
	}
	v.time("requested_at", e.RequestedAt)
	v.text("to", e.To)
	v.text("subject", e.Subject)
	v.text("body", e.Body)
	return v.err()
}

// EmailScheduled says an email was accepted for sending at SendAt. Its
// email.requested event is held back until then.
type EmailScheduled struct {
	EmailID     string    `json:"email_id"`
	To          string    `json:"to"`
	Subject     string    `json:"subject"`
	DocID       string    `json:"doc_id,omitempty"`
	SendAt      time.Time `json:"send_at"`
	ScheduledAt time.Time `json:"scheduled_at"`
}

// EventType implements Event.
func (*EmailScheduled) EventType() string { return TypeEmailScheduled }

// EventVersion implements Event.
func (*EmailScheduled) EventVersion() int { return 1 }

// Validate implements Event.
func (e *EmailScheduled) Validate() error {
	var v validator
	v.uuid("email_id", e.EmailID)
	if v.required("to", e.To) {
		if _, err := parseAddress(e.To); err != nil {
			v.add("to", err.Error())
		}
	}
	v.maxLen("subject", e.Subject, MaxSubjectBytes)
	if e.DocID != "" && !IsUUID(e.DocID) {
		v.add("doc_id", "must be a UUID")
	}
	v.time("send_at", e.SendAt)
	v.time("scheduled_at", e.ScheduledAt)
	v.text("to", e.To)
	v.text("subject", e.Subject)
	return v.err()
}

// EmailSent says an email was handed to the mail server.
type EmailSent struct {
	EmailID   string    `json:"email_id"`
	To        string    `json:"to"`
	MessageID string    `json:"message_id,omitempty"`
	Attempts  int       `json:"attempts"`
	SentAt    time.Time `json:"sent_at"`
}

// EventType implements Event.
func (*EmailSent) EventType() string { return TypeEmailSent }

// EventVersion implements Event.
func (*EmailSent) EventVersion() int { return 1 }

// Validate implements Event.
func (e *EmailSent) Validate() error {
	var v validator
	v.uuid("email_id", e.EmailID)
	v.count("attempts", int64(e.Attempts))
	v.time("sent_at", e.SentAt)
	v.text("to", e.To)
	v.text("message_id", e.MessageID)
	return v.err()
}

// EmailFailed says an email could not be sent and will not be retried.
type EmailFailed struct {
	EmailID  string    `json:"email_id"`
	Reason   string    `json:"reason"`
	Attempts int       `json:"attempts"`
	FailedAt time.Time `json:"failed_at"`
}

// EventType implements Event.
func (*EmailFailed) EventType() string { return TypeEmailFailed }

// EventVersion implements Event.
func (*EmailFailed) EventVersion() int { return 1 }

// Validate implements Event.
func (e *EmailFailed) Validate() error {
	var v validator
	v.uuid("email_id", e.EmailID)
	v.required("reason", e.Reason)
	v.maxLen("reason", e.Reason, MaxReasonBytes)
	v.count("attempts", int64(e.Attempts))
	v.time("failed_at", e.FailedAt)
	v.text("reason", e.Reason)
	return v.err()
}

// ParseAddress accepts one email address, optionally with a display name,
// and returns its normalised form. Errors read well after a field name.
//
// Unlike the validation of decoded events, it applies RFC 5321's lengths
// (addressLength): it checks addresses entering Conveyor.
func ParseAddress(s string) (*mail.Address, error) {
	a, err := parseAddress(s)
	if err != nil {
		return nil, err
	}
	if a == nil {
		a = &mail.Address{Address: s}
	}
	if err := addressLength(a.Address); err != nil {
		return nil, err
	}
	return a, nil
}

// addressLength applies RFC 5321's limits to addr, an address without
// display name.
func addressLength(addr string) error {
	if at := strings.LastIndexByte(addr, '@'); at > MaxLocalPartBytes || len(addr) > MaxAddressBytes {
		return errAddressTooLong
	}
	return nil
}

// ValidateIngest is ev.Validate plus the limits only what enters Conveyor
// must meet (RFC 5321's address lengths): the API applies it. Consumers
// apply Validate alone, so that events accepted before such a limit
// existed, still in streams or held back, are handled rather than
// dead-lettered.
func ValidateIngest(ev Event) error {
	if err := ev.Validate(); err != nil {
		return err
	}
	return ingestLimits(ev)
}

// ingestLimits checks what ValidateIngest adds to Validate.
func ingestLimits(ev Event) error {
	var v validator
	check := func(field, s string) {
		if _, err := ParseAddress(s); err != nil {
			v.add(field, err.Error())
		}
	}
	switch e := ev.(type) {
	case *EmailRequested:
		check("to", e.To)
	case *EmailScheduled:
		check("to", e.To)
	case *DocumentUploaded:
		if e.Notify != "" {
			check("notify", e.Notify)
		}
	}
	return v.err()
}

// parseAddress is ParseAddress without its allocation in the common case,
// for the validation of every decoded event: for a plain local@domain
// (printable ASCII atoms without quotes, comments, display name or
// spaces), for which mail.ParseAddress would return the string itself as
// the address, it returns a nil address and no error.
func parseAddress(s string) (*mail.Address, error) {
	if strings.IndexByte(s, '\r') >= 0 || strings.IndexByte(s, '\n') >= 0 {
		return nil, errInvalidAddress
	}
	addr := s
	var a *mail.Address
	if !isPlainAddress(s) {
		var err error
		if a, err = mail.ParseAddress(s); err != nil {
			return nil, errInvalidAddress
		}
		addr = a.Address
	}
	at := strings.LastIndexByte(addr, '@')
	if at < 1 || !strings.Contains(addr[at+1:], ".") && addr[at+1:] != "localhost" {
		return nil, errInvalidAddress
	}
	return a, nil
}

// isPlainAddress reports whether s has the common form local@domain, two
// dot-atoms, for which mail.ParseAddress returns s itself as the address.
func isPlainAddress(s string) bool {
	at := strings.IndexByte(s, '@')
	return at >= 0 && isDotAtom(s[:at]) && isDotAtom(s[at+1:])
}

// isDotAtom reports whether s is an RFC 5322 dot-atom of ASCII characters:
// atext runs joined by single dots.
func isDotAtom(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '.' {
			if s[i-1] == '.' {
				return false
			}
		} else if !atext[c] {
			return false
		}
	}
	return true
}

// atext marks the characters of RFC 5322 atoms: printable ASCII but
// space and the specials.
var atext = func() (t [256]bool) {
	for c := '!'; c < 0x7f; c++ {
		t[c] = !strings.ContainsRune(`()<>[]:;@\,".`, c)
	}
	return t
}()

type addressError struct{}

func (addressError) Error() string { return "must be a valid email address" }

var errInvalidAddress error = addressError{}

var errAddressTooLong = fmt.Errorf("must be at most %d bytes, with at most %d before the @", MaxAddressBytes, MaxLocalPartBytes)

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
