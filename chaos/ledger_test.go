package chaos

import (
	"fmt"
	"sort"
	"sync"
	"time"
)

// kind is the kind of work a request asks for.
type kind int

const (
	kindDocument kind = iota // POST /v1/documents
	kindEmail                // POST /v1/emails
	kindEvent                // POST /v1/events (email.requested with a client id)
	numKinds
)

func (k kind) String() string {
	return [...]string{"documents", "emails", "events"}[k]
}

// entry is one request the API accepted (answered 202).
type entry struct {
	item int
	kind kind
	// id is what the 202 named: doc_id, email_id or event_id.
	id string
	// emailID is the email the work must send, when it is known up
	// front: the email itself, or the email_id in an event's data.
	// Documents with notify send an email whose id only the read model
	// knows (by doc_id).
	emailID string
	// filename, notify and want describe a document: want is the final
	// status its content must reach (processed or failed).
	filename, notify, want string
	acceptedAt             time.Time
}

// ledger records every request the API accepted, and nothing else: a
// request that was refused, failed or given up is counted, never entered.
// It is safe for concurrent use.
type ledger struct {
	mu        sync.Mutex
	entries   []*entry
	byItem    map[int]*entry
	byID      map[string]*entry
	abandoned [numKinds]int
	// problems are answers that contradict the ledger (an accepted
	// request answered with another id, one id for two requests) or
	// requests the API refused although they were valid. Each fails the
	// run.
	problems []string
}

func newLedger() *ledger {
	return &ledger{byItem: map[int]*entry{}, byID: map[string]*entry{}}
}

// accept records that the API answered 202 with id for req. A second 202
// for the same request (a retry or a deliberate repeat) must name the same
// id; an event must be accepted under the id the client chose. A
// contradiction is recorded as a problem and returned.
func (l *ledger) accept(req request, id string, at time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	switch prev, seen := l.byItem[req.item]; {
	case req.kind == kindEvent && id != req.eventID:
		err = fmt.Errorf("event of item %d sent with id %s was accepted as %s", req.item, req.eventID, id)
	case seen && prev.id != id:
		err = fmt.Errorf("%s request %d was accepted as %s, then as %s", req.kind, req.item, prev.id, id)
	case seen:
		return nil
	case l.byID[id] != nil:
		err = fmt.Errorf("%s requests %d and %d were both accepted as %s", req.kind, l.byID[id].item, req.item, id)
	}
	if err != nil {
		l.problems = append(l.problems, err.Error())
		return err
	}
	e := &entry{item: req.item, kind: req.kind, id: id, emailID: req.emailID,
		filename: req.filename, notify: req.notify, want: req.want, acceptedAt: at}
	if req.kind == kindEmail {
		e.emailID = id
	}
	l.entries = append(l.entries, e)
	l.byItem[req.item] = e
	l.byID[id] = e
	return nil
}

// abandon counts a request that was never accepted.
func (l *ledger) abandon(k kind) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.abandoned[k]++
}

// problem records a failure of the run found by the generator.
func (l *ledger) problem(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.problems = append(l.problems, fmt.Sprintf(format, args...))
}

// snapshot returns the entries in the order of their items, the
// abandoned counts and the problems.
func (l *ledger) snapshot() ([]*entry, [numKinds]int, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append([]*entry(nil), l.entries...)
	sort.Slice(out, func(i, j int) bool { return out[i].item < out[j].item })
	return out, l.abandoned, append([]string(nil), l.problems...)
}

// accepted returns how many requests of each kind were accepted.
func (l *ledger) accepted() [numKinds]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n [numKinds]int
	for _, e := range l.entries {
		n[e.kind]++
	}
	return n
}

// has reports whether id was accepted.
func (l *ledger) has(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byID[id] != nil
}
