package handlers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
)

// EmailGroup is the consumer group of the email sender.
const EmailGroup = "email-sender"

// Marks records that an effect happened, keyed by id, with set-if-absent
// semantics, and holds locks. The email sender marks a sent email so a
// redelivered request does not send it again, and locks an email while it
// sends it, so that two deliveries of one email at once (the request
// published twice) do not both send it. *idem.Store implements it.
type Marks interface {
	// Get returns the value recorded for key, if any.
	Get(ctx context.Context, key string) (string, bool, error)
	// Set records value under key unless something is recorded already; it
	// reports whether it recorded.
	Set(ctx context.Context, key, value string) (bool, error)
	// Lock takes the lock key for lease unless it is held; it returns the
	// token that releases it.
	Lock(ctx context.Context, key string, lease time.Duration) (token string, ok bool, err error)
	// Extend renews the lock key for lease if token still holds it.
	Extend(ctx context.Context, key, token string, lease time.Duration) error
	// Unlock releases the lock key if token still holds it.
	Unlock(ctx context.Context, key, token string) error
}

// EmailSenderConfig configures an EmailSender.
type EmailSenderConfig struct {
	// Mailer sends. Required.
	Mailer Mailer
	// Marks remembers sent emails. Required.
	Marks Marks
	// Publisher publishes email.sent and email.failed. Required.
	Publisher Publisher
	// From is the sender address. Defaults to "Conveyor <conveyor@localhost>".
	From string
	// Timeout is the deadline of the context each Mailer.Send gets (the
	// SMTP mailer's dial honours it; SMTPConfig.Timeout bounds the rest).
	// Defaults to 30s.
	Timeout time.Duration
	// LockLease is how long an email's lock lasts unless its holder renews
	// it, which a running send does every third of it: a holder that died
	// (kill -9 during a send) blocks the email's redelivery for at most
	// this long, well within its retries. Defaults to 15s.
	LockLease time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time
}

// EmailSender handles email.requested: it sends the email once and
// publishes email.sent, or email.failed when the server rejects it for good
// or the retries are used up.
type EmailSender struct {
	cfg EmailSenderConfig
}

// NewEmailSender returns an EmailSender.
func NewEmailSender(cfg EmailSenderConfig) (*EmailSender, error) {
	if cfg.From == "" {
		cfg.From = "Conveyor <conveyor@localhost>"
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.LockLease == 0 {
		cfg.LockLease = 15 * time.Second
	}
	if cfg.LockLease < 10*time.Millisecond {
		return nil, fmt.Errorf("email sender: LockLease %s is under 10ms", cfg.LockLease)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	var errs []error
	if cfg.Mailer == nil {
		errs = append(errs, errors.New("email sender: Mailer is required"))
	}
	if cfg.Marks == nil {
		errs = append(errs, errors.New("email sender: Marks is required"))
	}
	if cfg.Publisher == nil {
		errs = append(errs, errors.New("email sender: Publisher is required"))
	}
	if _, err := events.ParseAddress(cfg.From); err != nil {
		errs = append(errs, fmt.Errorf("email sender: From %q: %w", cfg.From, err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &EmailSender{cfg: cfg}, nil
}

// Register adds the handler to r.
func (s *EmailSender) Register(r *bus.Router, opts ...bus.HandlerOption) error {
	return bus.Handle(r, EmailGroup, s.Handle, opts...)
}

func sentKey(emailID string) string    { return "email-sent:" + emailID }
func sendingKey(emailID string) string { return "email-sending:" + emailID }

// afterSendTimeout bounds what follows a send the server accepted (the
// sent mark, the email.sent event). It runs even when the handler's context
// is cancelled (shutdown, the handler timeout): a mark given up on sends
// the mail again on the redelivery.
const afterSendTimeout = 30 * time.Second

// errSendingElsewhere is returned while another delivery of the same email
// is sending it; the retry finds it sent, or sends it if that send failed.
var errSendingElsewhere = errors.New("another delivery of this email is sending it")

// Handle sends one requested email.
//
// The sent mark is keyed by the email id and written only after the server
// accepted the mail. A crash between the two sends the mail again on
// redelivery: that window (one SET) is as small as an at-least-once world
// allows, and the Message-ID lets receivers drop the copy. Two deliveries
// of one email at once take turns: each sends only under the email's lock,
// and looks at the mark again once it holds it.
func (s *EmailSender) Handle(ctx context.Context, ev *events.EmailRequested) error {
	env, _ := bus.EnvelopeFrom(ctx)
	parent := env.ID
	if parent == "" {
		parent = ev.EmailID
	}
	// A UUID names the same email in capitals (the api and the store
	// read ids so): the mark, the lock and the Message-ID use one spelling.
	// (Marks written before ids were lowercased have the id as it came:
	// the first look also tries that spelling.)
	asGiven := ev.EmailID
	ev.EmailID = strings.ToLower(ev.EmailID)
	sent, err := s.sent(ctx, ev.EmailID, asGiven)
	if err != nil {
		return err
	}
	if sent {
		// Sent before; the publish below may not have happened then.
		s.cfg.Logger.InfoContext(ctx, "email already sent; not sending again", "email_id", ev.EmailID, "event_id", env.ID)
		return s.publishSent(ctx, parent, ev)
	}

	token, locked, err := s.lock(ctx, ev.EmailID)
	if err != nil {
		return fmt.Errorf("lock email %s for sending: %w", ev.EmailID, err)
	}
	if !locked {
		if bus.IsLastAttempt(ctx) {
			// The lock outlived a wait longer than its lease: a live
			// delivery holds it and renews it, and decides the email's
			// outcome (sent, or failed after its own retries). This copy
			// is not needed, and must not end in the dead letters.
			s.cfg.Logger.InfoContext(ctx, "email being sent by another delivery; leaving it to that one", "email_id", ev.EmailID, "event_id", env.ID)
			return nil
		}
		return fmt.Errorf("email %s: %w", ev.EmailID, errSendingElsewhere)
	}
	defer s.holdLock(ctx, ev.EmailID, token)()
	// A delivery that held the lock until just now may have sent it.
	if sent, err := s.sent(ctx, ev.EmailID, asGiven); err != nil {
		return err
	} else if sent {
		return s.publishSent(ctx, parent, ev)
	}

	sendCtx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	err = s.cfg.Mailer.Send(sendCtx, Mail{
		// Date is when the mail enters the mail system (RFC 5322 §3.6.1):
		// now, not when it was requested, which is up to MAX_DELAY earlier
		// for an email held back until its send_at.
		ID: ev.EmailID, From: s.cfg.From, To: ev.To, Subject: ev.Subject, Body: ev.Body, Date: s.cfg.Now(),
	})
	cancel()
	if err != nil {
		if bus.IsPermanent(err) || finalAttempt(ctx) {
			return s.publishFailed(ctx, parent, ev, err)
		}
		return fmt.Errorf("send email %s: %w", ev.EmailID, err)
	}
	after, cancel := context.WithTimeout(context.WithoutCancel(ctx), afterSendTimeout)
	defer cancel()
	if err := s.markSent(after, ev.EmailID); err != nil {
		return err
	}
	return s.publishSent(after, parent, ev)
}

// lock takes the email's lock. On the last attempt it waits for the lock
// a little longer than its lease: the holder may be a delivery that died
// (this same entry, claimed after a kill -9 on its last attempt), whose
// lock then ends; only a live holder, renewing it, keeps it that long.
func (s *EmailSender) lock(ctx context.Context, emailID string) (token string, ok bool, err error) {
	var deadline time.Time
	if bus.IsLastAttempt(ctx) {
		deadline = time.Now().Add(s.cfg.LockLease + s.cfg.LockLease/2)
	}
	for {
		token, ok, err = s.cfg.Marks.Lock(ctx, sendingKey(emailID), s.cfg.LockLease)
		if err != nil || ok || !time.Now().Before(deadline) {
			return token, ok, err
		}
		select {
		case <-ctx.Done():
			return "", false, ctx.Err()
		case <-time.After(s.cfg.LockLease / 10):
		}
	}
}

// holdLock renews the email's lock while the handler runs, and returns
// the function that stops renewing and releases it. A release that fails
// leaves the lock to end with its lease.
func (s *EmailSender) holdLock(ctx context.Context, emailID, token string) (release func()) {
	key := sendingKey(emailID)
	stop := idem.Renew(ctx, s.cfg.LockLease/3,
		func(ctx context.Context) error { return s.cfg.Marks.Extend(ctx, key, token, s.cfg.LockLease) },
		func(err error) {
			// The send goes on: stopping it half way could not take back
			// what the server may already have.
			s.cfg.Logger.WarnContext(ctx, "renew the lock of an email being sent", "email_id", emailID, "error", err)
		})
	return func() {
		stop()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), afterSendTimeout)
		defer cancel()
		if err := s.cfg.Marks.Unlock(ctx, key, token); err != nil {
			s.cfg.Logger.WarnContext(ctx, "unlock email after sending", "email_id", emailID, "error", err)
		}
	}
}

// sent reports whether the email's sent mark is there, under emailID or,
// if it differs, asGiven.
func (s *EmailSender) sent(ctx context.Context, emailID, asGiven string) (bool, error) {
	ids := []string{emailID}
	if asGiven != emailID {
		ids = append(ids, asGiven)
	}
	for _, id := range ids {
		_, sent, err := s.cfg.Marks.Get(ctx, sentKey(id))
		if err != nil {
			return false, fmt.Errorf("check sent mark of email %s: %w", emailID, err)
		}
		if sent {
			return true, nil
		}
	}
	return false, nil
}

// markSent records the send. It tries hard: failing here means the mail is
// sent again on the retry.
func (s *EmailSender) markSent(ctx context.Context, emailID string) error {
	var err error
	for i, wait := 0, 50*time.Millisecond; i < 8; i, wait = i+1, wait*2 {
		if _, err = s.cfg.Marks.Set(ctx, sentKey(emailID), s.cfg.Now().UTC().Format(time.RFC3339Nano)); err == nil {
			return nil
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return fmt.Errorf("mark email %s sent: %w", emailID, errors.Join(err, ctx.Err()))
		}
	}
	return fmt.Errorf("mark email %s sent: %w", emailID, err)
}

func (s *EmailSender) publishSent(ctx context.Context, parent string, ev *events.EmailRequested) error {
	sent := &events.EmailSent{
		EmailID:   ev.EmailID,
		To:        ev.To,
		MessageID: "<" + ev.EmailID + "@conveyor>",
		Attempts:  max(bus.Attempt(ctx), 1),
		SentAt:    s.cfg.Now().UTC(),
	}
	if _, err := s.cfg.Publisher.PublishEvent(ctx, sent, bus.WithID(events.DerivedID(parent, "sent"))); err != nil {
		return fmt.Errorf("publish email.sent for %s: %w", ev.EmailID, err)
	}
	return nil
}

func (s *EmailSender) publishFailed(ctx context.Context, parent string, ev *events.EmailRequested, cause error) error {
	failed := &events.EmailFailed{
		EmailID:  ev.EmailID,
		Reason:   truncate(cause.Error(), events.MaxReasonBytes-8),
		Attempts: max(bus.Attempt(ctx), 1),
		FailedAt: s.cfg.Now().UTC(),
	}
	if _, err := s.cfg.Publisher.PublishEvent(ctx, failed, bus.WithID(events.DerivedID(parent, "failed"))); err != nil {
		return fmt.Errorf("publish email.failed for %s: %w", ev.EmailID, err)
	}
	s.cfg.Logger.WarnContext(ctx, "email failed for good", "email_id", ev.EmailID, "attempts", failed.Attempts, "error", cause)
	return nil
}
